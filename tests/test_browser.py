"""The widgets work in a real browser: JupyterLab + Chromium, driven like a learner would.

The test starts JupyterLab on a free loopback port (token set, no browser, a temporary copy of
notebooks/ as its root, temporary Jupyter config/runtime/data/settings/workspace folders so
nothing leaks in or out), opens notebooks/05_guidance_and_widgets.ipynb in Debian's Chromium
through Playwright, runs all cells from the Run menu, waits for the kernel to go idle, then
moves the guidance slider and the steps slider with the keyboard and checks that the
displayed image changes each time and that no cell shows an error.

Screenshots go to test-artifacts/browser/ (git-ignored); timings are printed (run pytest
with -s to see them; they are also attached to the test report).

Needs Chromium: `apt-get install chromium` (Debian/Ubuntu; .ci/run installs it). Without it
the test is skipped with that message. Playwright's own browser downloads are not used.

Network: JupyterLab runs with tests/offline_guard.py's guard, kernels inherit it
(tests/conftest.py), and Chromium resolves no host names and sends anything outside loopback
to a dead proxy; the test also asserts that the page requested nothing outside 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "05_guidance_and_widgets.ipynb"
ARTIFACTS = ROOT / "test-artifacts" / "browser"
CHROMIUM = os.environ.get("SDKIT_CHROMIUM") or next(
    (p for p in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser"),
                 shutil.which("google-chrome")) if p and os.path.isfile(p)), "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",  # Chromium refuses to run as root with its sandbox; CI machines are root
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    # offline by construction: no DNS, and anything not on loopback goes to a dead proxy
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--proxy-server=http://127.0.0.1:9",
]
# widget CSS classes set by sdkit.widgets (see the GuidancePanel docstring); the panel is the
# notebook's last displayed .sdkit-panel (or, without one, the last of each widget)
PANEL = ".sdkit-panel"
GUIDANCE = ".sdkit-guidance"
STEPS = ".sdkit-steps"
IMAGE = "img.sdkit-image, .sdkit-image img"
ERROR_LINE = ".sdkit-error"

# a few times what an idle 2-core machine needs; on a loaded machine (other jobs, CI runners
# sharing cores) multiply them all with SDKIT_BROWSER_TIMEOUT_SCALE, e.g. 4
_SCALE = float(os.environ.get("SDKIT_BROWSER_TIMEOUT_SCALE", "1"))
LAB_START_TIMEOUT = 120 * _SCALE  # s
RUN_ALL_TIMEOUT = 240 * _SCALE  # s, the whole notebook
SLIDER_TIMEOUT = 60 * _SCALE  # s, one regeneration after a slider move

# JupyterLab settings for the test: no news/update checks (they would go online and pop up),
# and start the notebook's own kernel without asking
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {
        "autoStartDefaultKernel": True},
}
STATUS_JS = """() => {
    const bar = document.querySelector('#jp-main-statusbar');
    return bar ? bar.innerText : '';
}"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chromium_or_skip() -> str:
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(f"Chromium not found at {CHROMIUM}: install it with "
                    "`sudo apt-get install chromium` (Debian/Ubuntu; .ci/run does this) or set "
                    "SDKIT_CHROMIUM to a Chromium/Chrome binary")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("the Python package playwright is missing: `make setup` installs it")
    return CHROMIUM


class Lab:
    """A JupyterLab server in a subprocess, isolated in ``home``, serving ``root``."""

    def __init__(self, root: Path, home: Path):
        self.port = _free_port()
        self.token = os.urandom(16).hex()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        env.update(
            JUPYTER_CONFIG_DIR=str(home / "config"),
            JUPYTER_RUNTIME_DIR=str(home / "runtime"),
            JUPYTER_DATA_DIR=str(home / "data"),
            JUPYTERLAB_SETTINGS_DIR=str(home / "settings"),
            JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"),
            JUPYTER_PLATFORM_DIRS="1",
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        )
        for rel, value in LAB_SETTINGS.items():
            path = home / "settings" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(value), encoding="utf-8")
        # the server itself runs with the socket guard too
        launcher = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); "
                    "import offline_guard; offline_guard.block_network(); "
                    "from jupyterlab.labapp import main; sys.exit(main())")
        cmd = [sys.executable, "-c", launcher,
               "--no-browser", "--ip=127.0.0.1", f"--port={self.port}", "--port-retries=0",
               f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={root}",
               "--ServerApp.open_browser=False", "--LabApp.news_url=None",
               "--LabApp.check_for_updates_class=jupyterlab.handlers.announcements.NeverCheckForUpdate"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allow-root")
        self.log_path = home / "lab.log"
        self.log = open(self.log_path, "w", encoding="utf-8")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/api/status?token={self.token}",
                                            timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"JupyterLab did not answer in {timeout} s:\n{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        self.log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-n:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # jupyter shuts its kernels down on SIGTERM
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


def _wait_idle(page, timeout: float) -> None:
    """Wait until every code cell ran ([n]: prompts, none pending) and the kernel is idle."""
    deadline = time.monotonic() + timeout
    js = """() => {
        const prompts = [...document.querySelectorAll(
            '.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell .jp-InputPrompt')]
            .map(p => p.textContent.trim());
        const ind = document.querySelector(
            '.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook-ExecutionIndicator');
        const bar = document.querySelector('#jp-main-statusbar');
        return {prompts, status: ind ? ind.getAttribute('data-status') : null,
                bar: bar ? bar.innerText : ''};
    }"""
    state = None
    while time.monotonic() < deadline:
        state = page.evaluate(js)
        prompts = state["prompts"]
        ran = prompts and all(re.fullmatch(r"\[\d+\]:", p) for p in prompts)
        if ran and state["status"] in ("idle", None) and "| Idle" in state["bar"]:
            # confirm: idle twice in a row, half a second apart
            page.wait_for_timeout(500)
            again = page.evaluate(js)
            if again == state:
                return
        page.wait_for_timeout(500)
    raise TimeoutError(f"the notebook did not finish in {timeout} s; last state {state}")


def _wait_kernel_ready(page, timeout: float) -> None:
    """Wait for the status bar to say 'Python 3 (ipykernel) | Idle'; accept a kernel dialog."""
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        dialog = page.locator(".jp-Dialog")
        if dialog.count() and "Select Kernel" in dialog.first.inner_text():
            dialog.first.locator("button.jp-mod-accept").click()  # the notebook's own kernel
        status = page.evaluate(STATUS_JS)
        if re.search(r"Python 3.*\| Idle", status):
            return
        page.wait_for_timeout(500)
    raise TimeoutError(f"the kernel did not start in {timeout} s; status bar: {status!r}")


def _errors_shown(page) -> list[str]:
    texts = page.evaluate("""() => [...document.querySelectorAll(
        '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"], ' +
        '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.error"]')]
        .map(e => e.innerText)""")
    bad = [t for t in texts if "Traceback" in t or "Error" in t]
    body = page.inner_text("body")
    for marker in ("Error displaying widget", "Failed to display Jupyter Widget",
                   "Kernel Restarting", "The kernel appears to have died"):
        if marker in body:
            bad.append(marker)
    return bad


def _move_slider(root, selector: str, key: str, presses: int) -> None:
    """Focus the slider's handle and press an arrow key, as a keyboard user would."""
    handle = root.locator(f"{selector} .noUi-handle").last
    handle.scroll_into_view_if_needed()
    handle.focus()
    for _ in range(presses):
        handle.press(key)


def _readout(root, selector: str) -> str:
    return root.locator(f"{selector} .widget-readout").last.inner_text().strip()


def _wait_new_src(page, image, old_src: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        src = image.get_attribute("src")
        if src and src != old_src:
            return src
        page.wait_for_timeout(100)
    raise TimeoutError(f"the image did not change within {timeout} s")


def drive_notebook(notebook: Path, workdir: Path, artifacts: Path, chromium: str) -> dict:
    """Open ``notebook`` in JupyterLab in Chromium, run it, move both sliders; return timings."""
    from playwright.sync_api import sync_playwright

    artifacts.mkdir(parents=True, exist_ok=True)
    root = workdir / "root"
    shutil.copytree(notebook.parent, root / notebook.parent.name,
                    ignore=shutil.ignore_patterns(".ipynb_checkpoints", "*.pyc"))
    rel = f"{notebook.parent.name}/{notebook.name}"
    timings: dict[str, float] = {}
    outside: list[str] = []

    t0 = time.perf_counter()
    lab = Lab(root, workdir / "jupyter")
    try:
        lab.wait_ready(LAB_START_TIMEOUT)
        timings["lab_start_s"] = time.perf_counter() - t0
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(LAB_START_TIMEOUT * 1000)
            page.set_default_navigation_timeout(LAB_START_TIMEOUT * 1000)

            def note_request(request):
                url = request.url
                if not url.startswith((lab.url, "data:", "blob:", "about:")):
                    outside.append(url)

            page.on("request", note_request)
            try:
                t = time.perf_counter()
                page.goto(f"{lab.url}/lab/tree/{rel}?token={lab.token}")
                page.wait_for_selector(".jp-NotebookPanel .jp-Cell")
                _wait_kernel_ready(page, LAB_START_TIMEOUT)
                timings["notebook_open_s"] = time.perf_counter() - t
                page.screenshot(path=str(artifacts / "1-opened.png"))

                t = time.perf_counter()
                page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
                page.locator(".lm-Menu-itemLabel",
                             has_text=re.compile(r"^Run All Cells$")).click()
                _wait_idle(page, RUN_ALL_TIMEOUT)
                timings["run_all_s"] = time.perf_counter() - t
                panel = page.locator(PANEL).last if page.locator(PANEL).count() else page
                image = panel.locator(IMAGE).last
                image.wait_for(state="visible", timeout=30_000)
                image.scroll_into_view_if_needed()
                page.screenshot(path=str(artifacts / "2-ran.png"))
                errors = _errors_shown(page)
                assert not errors, f"cells show errors after Run All: {errors}"
                assert image.get_attribute("src"), "the panel shows no image after Run All"

                for name, selector, key in (("guidance", GUIDANCE, "ArrowRight"),
                                            ("steps", STEPS, "ArrowRight")):
                    src = image.get_attribute("src")
                    pixels = image.screenshot()
                    value = _readout(panel, selector)
                    t = time.perf_counter()
                    _move_slider(panel, selector, key, presses=1)
                    new_src = _wait_new_src(page, image, src, SLIDER_TIMEOUT)
                    timings[f"{name}_first_image_s"] = time.perf_counter() - t
                    _wait_idle(page, SLIDER_TIMEOUT)
                    timings[f"{name}_response_s"] = time.perf_counter() - t
                    new_value = _readout(panel, selector)
                    page.screenshot(path=str(artifacts / f"3-moved-{name}.png"))
                    assert new_value != value, f"{name} slider did not move ({value})"
                    assert new_src != src
                    assert image.screenshot() != pixels, \
                        f"{name} {value} -> {new_value}: the image src changed but not its pixels"
                    errors = _errors_shown(page)
                    assert not errors, f"errors after moving the {name} slider: {errors}"
                    error_line = panel.locator(ERROR_LINE)
                    if error_line.count():
                        text = error_line.last.inner_text().strip()
                        assert not text, f"the panel shows an error after the {name} move: {text}"
            except Exception:
                page.screenshot(path=str(artifacts / "failure.png"))
                raise
            finally:
                browser.close()
    except Exception as e:
        raise AssertionError(f"{e}\n--- JupyterLab log (tail) ---\n{lab.tail()}") from e
    finally:
        lab.stop()
    assert not outside, f"the page requested addresses outside loopback: {outside[:5]}"
    return timings


@pytest.mark.timeout(LAB_START_TIMEOUT * 2 + RUN_ALL_TIMEOUT + 2 * SLIDER_TIMEOUT * 2 + 60)
def test_widgets_respond_in_a_real_browser(tmp_path, record_property):
    chromium = _chromium_or_skip()
    assert NOTEBOOK.exists(), f"{NOTEBOOK} is missing"
    timings = drive_notebook(NOTEBOOK, tmp_path, ARTIFACTS, chromium)
    for key, value in timings.items():
        record_property(key, round(value, 2))
    print("\nbrowser test timings: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    assert set(timings) >= {"lab_start_s", "run_all_s", "guidance_response_s",
                            "steps_response_s"}
