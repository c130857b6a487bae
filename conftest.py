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
os.environ.setdefault("MPLBACKEND", "Agg")

if str(TESTS_DIR) not in sys.path:  # test-only helpers (offline_guard, single_file) live here
    sys.path.insert(0, str(TESTS_DIR))

import offline_guard  # noqa: E402  (after the environment is set)

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

_TEST_HOME = Path(tempfile.mkdtemp(prefix="sdkit-tests-"))
_startup = _TEST_HOME / "ipython" / "profile_default" / "startup"
_startup.mkdir(parents=True)
(_startup / "00-sdkit-offline.py").write_text(KERNEL_STARTUP, encoding="utf-8")
os.environ["IPYTHONDIR"] = str(_TEST_HOME / "ipython")
os.environ[offline_guard.LOG_ENV] = str(_TEST_HOME / "network-blocked.log")
offline_guard.block_network()


# ------------------------------------------------------------------------------ reporting


def pytest_report_header(config):
    return (f"network: blocked outside loopback (tests/offline_guard.py) here and in kernels "
            f"(IPYTHONDIR={os.environ['IPYTHONDIR']})")


def pytest_terminal_summary(terminalreporter):
    log = Path(os.environ[offline_guard.LOG_ENV])
    lines = log.read_text(encoding="utf-8").splitlines() if log.exists() else []
    terminalreporter.write_sep(
        "-", f"network attempts refused by tests/offline_guard.py: {len(lines)} "
        "(tests/test_offline.py makes some on purpose)")
    for line in lines[:50]:
        terminalreporter.write_line(line)


def pytest_unconfigure(config):
    shutil.rmtree(_TEST_HOME, ignore_errors=True)
