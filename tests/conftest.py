"""Shared pytest set-up: tests never reach a model hub and never open a plot window.

The network is blocked by construction, in this process and in every notebook kernel:

- ``sdkit.offline.block_network()`` runs here, before any test is collected, so any
  connection outside loopback raises ``NetworkBlockedError`` at once;
- nbval (and nbclient, and the browser test's JupyterLab) start their kernels as child
  processes that inherit this environment; ``IPYTHONDIR`` points them at a throw-away IPython
  profile whose startup file blocks the network in the kernel before the first cell runs;
- ``SDKIT_NETWORK_LOG`` collects every refused attempt (from all processes); the terminal
  summary lists them.
"""

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")

from sdkit import offline  # noqa: E402  (after the environment is set)

KERNEL_STARTUP = '''\
# Written by tests/conftest.py for the duration of a test run: block the network in the kernel.
import sdkit.offline

sdkit.offline.block_network()
'''

_TEST_HOME = Path(tempfile.mkdtemp(prefix="sdkit-tests-"))
_startup = _TEST_HOME / "ipython" / "profile_default" / "startup"
_startup.mkdir(parents=True)
(_startup / "00-sdkit-offline.py").write_text(KERNEL_STARTUP, encoding="utf-8")
os.environ["IPYTHONDIR"] = str(_TEST_HOME / "ipython")
os.environ[offline.LOG_ENV] = str(_TEST_HOME / "network-blocked.log")
offline.block_network()


@pytest.fixture(scope="session")
def toy_pipe():
    """The kit's toy pipeline (sdkit.pipeline.load_pipeline(), CPU float32), loaded once.

    Skips (with how to get it) when data/toy-sd has not been trained yet. A snapshot being
    written at that moment is retried a few times.
    """
    from sdkit.pipeline import ModelNotFoundError, load_pipeline

    for attempt in range(4):
        try:
            pipe = load_pipeline("toy", device="cpu", dtype="float32")
            break
        except ModelNotFoundError as e:
            pytest.skip(f"the toy model is not trained yet: {e}")
        except (OSError, ValueError, RuntimeError):  # a snapshot half-written right now
            if attempt == 3:
                raise
            time.sleep(5)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pytest_report_header(config):
    return (f"network: blocked outside loopback (sdkit.offline) here and in kernels "
            f"(IPYTHONDIR={os.environ['IPYTHONDIR']})")


def pytest_terminal_summary(terminalreporter):
    log = Path(os.environ[offline.LOG_ENV])
    lines = log.read_text(encoding="utf-8").splitlines() if log.exists() else []
    terminalreporter.write_sep(
        "-", f"network attempts refused by sdkit.offline: {len(lines)} "
        "(tests/test_offline.py makes some on purpose)")
    for line in lines[:50]:
        terminalreporter.write_line(line)


def pytest_unconfigure(config):
    shutil.rmtree(_TEST_HOME, ignore_errors=True)
