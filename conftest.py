"""The test run's set-up, for every test and every notebook pytest collects in this folder
(``make test``, or one notebook: ``pytest notebooks/01_forward_noising.ipynb``): tests never
reach a model hub and never open a plot window, and notebooks run with their exercises'
reference solutions applied.

The network is blocked by construction, in this process and in every notebook kernel:

- ``offline_guard.block_network()`` (tests/offline_guard.py) runs here, before any test is
  collected, so any connection outside loopback raises ``NetworkBlockedError`` at once;
- nbval (and nbclient, and the browser test's JupyterLab) start their kernels as child
  processes that inherit this environment; ``IPYTHONDIR`` points them at a throw-away IPython
  profile whose startup file imports tests/offline_guard.py by absolute path and blocks the
  network in the kernel before the first cell runs;
- ``SDKIT_NETWORK_LOG`` collects every refused attempt (from all processes); the terminal
  summary lists them.

The same startup file runs every notebook with its exercise's reference solution applied
(tests/exercise_solutions.py; ``SDKIT_APPLY_SOLUTIONS=0`` runs them as a learner gets them).
The tests' fixtures (the tiny pipeline, the toy pipeline) are in tests/conftest.py.

A clean screen (issue 16): every notebook cell nbval runs is also checked, in the same run,
for stderr output and warnings that tests/allowed_output.py does not allow
(``pytest_runtest_call`` below reads the outputs nbval collected for the cell); such a cell
fails with the offending lines quoted.

The browser test (tests/test_browser.py) runs the notebooks that ``SDKIT_BROWSER_NOTEBOOKS``
names (a comma list of numbers, or ``all``; default ``BROWSER_DEFAULT``); the others are
deselected here, and the report header says which ran.
"""

import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent
TESTS_DIR = REPO_DIR / "tests"

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
if "MPLBACKEND" not in os.environ:
    # plots off screen in this process only; not through the environment, which notebook
    # kernels inherit: they keep Jupyter's inline backend, so figures render (and any warning
    # drawing them prints shows) as on a learner's screen
    import matplotlib

    matplotlib.use("Agg")

if str(TESTS_DIR) not in sys.path:  # test-only helpers (offline_guard, single_file) live here
    sys.path.insert(0, str(TESTS_DIR))

import allowed_output  # noqa: E402
import offline_guard  # noqa: E402  (after the environment is set)
import pytest  # noqa: E402

try:
    from nbval.plugin import IPyNbCell, NbCellError
except ImportError:  # nbval missing: no notebook is collected, nothing to check
    IPyNbCell = NbCellError = None

# a handout (`make handout`) has no solutions/: its notebooks run as the learners get them
default_apply = "1" if (REPO_DIR / "notebooks" / "solutions").is_dir() else "0"
KERNEL_STARTUP = f'''\
# Written by tests/conftest.py for the duration of a test run: block the network in the kernel.
import sys

sys.path.insert(0, {str(TESTS_DIR)!r})
import offline_guard

offline_guard.block_network()

# with the reference solutions applied (tests/exercise_solutions.py) unless told otherwise
import os

if os.environ.get("SDKIT_APPLY_SOLUTIONS", {default_apply!r}) == "1":
    import exercise_solutions
    from IPython import get_ipython

    exercise_solutions.install(get_ipython(), {str(REPO_DIR / "notebooks")!r})
'''

# One throw-away home per test run. `make test` runs pytest-xdist workers (``-n``): they inherit
# the controller's SDKIT_TEST_HOME, so every kernel gets the same startup file and every refused
# network attempt lands in the one log the controller's summary reads; the controller removes it.
_WORKER = "PYTEST_XDIST_WORKER" in os.environ and "SDKIT_TEST_HOME" in os.environ
if _WORKER:
    _TEST_HOME = Path(os.environ["SDKIT_TEST_HOME"])
else:
    _TEST_HOME = Path(tempfile.mkdtemp(prefix="sdkit-tests-"))
    os.environ["SDKIT_TEST_HOME"] = str(_TEST_HOME)
_startup = _TEST_HOME / "ipython" / "profile_default" / "startup"
_startup.mkdir(parents=True, exist_ok=True)
(_startup / "00-sdkit-offline.py").write_text(KERNEL_STARTUP, encoding="utf-8")
os.environ["IPYTHONDIR"] = str(_TEST_HOME / "ipython")
os.environ[offline_guard.LOG_ENV] = str(_TEST_HOME / "network-blocked.log")
offline_guard.block_network()


# ------------------------------------------------------------------------------ a clean screen


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """After nbval ran a notebook cell without error, fail it if its outputs show stderr or a
    warning that tests/allowed_output.py does not allow (nbval keeps the cell's outputs,
    streams merged and carriage returns applied, in ``item.test_outputs``)."""
    result = yield
    if IPyNbCell is not None and isinstance(item, IPyNbCell):
        bad = allowed_output.offending(item.test_outputs, item.path.name)
        if bad:
            raise NbCellError(item.cell_num, allowed_output.explain(bad, item.path.name),
                              item.cell.source)
    return result


# ------------------------------------------------------------------------------ browser test

# notebooks the browser test runs under `make test` (CI): the widget notebooks (02's steps
# slider, 06's panel) and the quickest (00); `make test-browser` runs them all
BROWSER_DEFAULT = "00,02,06"
BROWSER_TEST = "tests/test_browser.py::test_notebook_in_browser["


def browser_notebooks() -> tuple[list[str], list[str]]:
    """(selected, deselected) notebook stems for tests/test_browser.py, from
    ``SDKIT_BROWSER_NOTEBOOKS`` ('all', or numbers such as '0,5,11'; default BROWSER_DEFAULT)."""
    stems = sorted(p.stem for p in (REPO_DIR / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    raw = os.environ.get("SDKIT_BROWSER_NOTEBOOKS", "").strip() or BROWSER_DEFAULT
    if raw.lower() == "all":
        return stems, []
    numbers = {int(n) for n in raw.replace(" ", "").split(",") if n.isdigit()}
    words = [n for n in raw.replace(" ", "").split(",") if n and not n.isdigit()]
    known = {int(s[:2]) for s in stems}
    if words or not numbers or numbers - known:
        raise pytest.UsageError(
            f"SDKIT_BROWSER_NOTEBOOKS={raw!r} is not allowed: 'all' or a comma list of notebook "
            f"numbers from {sorted(known)}")
    return ([s for s in stems if int(s[:2]) in numbers],
            [s for s in stems if int(s[:2]) not in numbers])


def pytest_collection_modifyitems(config, items):
    _, deselected = browser_notebooks()
    drop = [i for i in items if i.nodeid.startswith(BROWSER_TEST)
            and i.nodeid[len(BROWSER_TEST):-1] in deselected]
    if drop:
        config.hook.pytest_deselected(items=drop)
        dropped = {id(i) for i in drop}
        items[:] = [i for i in items if id(i) not in dropped]


# ------------------------------------------------------------------------------ reporting


def pytest_report_header(config):
    selected, deselected = browser_notebooks()
    return [f"network: blocked outside loopback (tests/offline_guard.py) here and in kernels "
            f"(IPYTHONDIR={os.environ['IPYTHONDIR']})",
            f"browser test: runs notebooks {', '.join(s[:2] for s in selected)}; deselects "
            f"{', '.join(s[:2] for s in deselected) or 'none'} (SDKIT_BROWSER_NOTEBOOKS="
            f"{os.environ.get('SDKIT_BROWSER_NOTEBOOKS', '') or BROWSER_DEFAULT}; 'all' or a "
            "comma list of numbers; make test-browser runs all)"]


def pytest_terminal_summary(terminalreporter):
    log = Path(os.environ[offline_guard.LOG_ENV])
    lines = log.read_text(encoding="utf-8").splitlines() if log.exists() else []
    terminalreporter.write_sep(
        "-", f"network attempts refused by tests/offline_guard.py: {len(lines)} "
        "(tests/test_offline.py makes some on purpose)")
    for line in lines[:50]:
        terminalreporter.write_line(line)


def pytest_unconfigure(config):
    if not _WORKER:
        shutil.rmtree(_TEST_HOME, ignore_errors=True)
