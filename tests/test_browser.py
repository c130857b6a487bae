"""Every notebook works in a real browser: JupyterLab + Chromium, driven like a learner would.

One JupyterLab server (module-scoped fixture: a free loopback port, token set, no browser, a
temporary copy of notebooks/ as its root, temporary Jupyter config/runtime/data/settings/
workspace folders so nothing leaks in or out) and one Chromium (Debian's, through Playwright)
serve ``test_notebook_in_browser``, parametrized over every notebook in notebooks/. For each:
open it (in a workspace of its own), Run All from the Run menu, wait for idle, then

- no cell shows an error output, a dead kernel or a widget that failed to display;
- no cell shows red (stderr) output that tests/allowed_output.py does not allow (the same
  allow-list the nbval run uses);
- the widget notebooks' sliders are moved with the keyboard and the image must change: 06's
  GuidancePanel (guidance, steps), every ``interact`` slider with a picture (02's steps);
  a notebook whose code calls ``interact(`` or ``GuidancePanel(`` must show them;
- screenshots: test-artifacts/browser/<notebook>/ (git-ignored): ``1-opened.png``,
  ``2-ran.png`` (the top of the notebook after Run All), ``cell-NN.png`` (each code cell's
  outputs, scrolled into view), ``3-moved-*.png`` after each slider move, ``failure.png``;
  ``timings.json`` (also printed with -s, and in the report); then the kernel is shut down.

Which run: ``SDKIT_BROWSER_NOTEBOOKS`` (numbers, e.g. ``3,7``, or ``all``); by default
conftest.py's ``BROWSER_DEFAULT`` (the widget notebooks and the quickest: CI's time). The
others are deselected there, and the report header names both. ``make test-browser`` runs
all (about 10 minutes on an idle 2-core machine).

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

import allowed_output
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
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
RUN_ALL_TIMEOUT = 480 * _SCALE  # s, the whole notebook (10, the slowest, takes ~3 min)
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


# textContent, not innerText: JupyterLab skips rendering cells out of view
# (content-visibility), and innerText of a cell not rendered is empty
OUTPUTS_JS = """() => {
    const panel = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)') || document;
    const outer = (sel) => [...panel.querySelectorAll(sel)]
        .filter(e => !e.parentElement.closest(sel));
    return {
        stderr: outer('[data-mime-type="application/vnd.jupyter.stderr"]')
            .map(e => e.textContent),
        error: outer('[data-mime-type="application/vnd.jupyter.error"]').map(e => e.textContent),
        body: document.body.textContent,
    };
}"""
BROKEN_MARKERS = ("Error displaying widget", "Failed to display Jupyter Widget",
                  "Kernel Restarting", "The kernel appears to have died")


def _problems_shown(page, notebook: str) -> list[str]:
    """Error outputs, broken widgets or a dead kernel, and red (stderr) output that
    tests/allowed_output.py does not allow, as the page shows them now."""
    shown = page.evaluate(OUTPUTS_JS)
    bad = [f"error output: {t.strip()[:600]}" for t in shown["error"]]
    bad += allowed_output.offending_text(shown["stderr"], notebook)
    bad += [marker for marker in BROKEN_MARKERS if marker in shown["body"]]
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




def _shutdown_kernels(lab: Lab) -> None:
    """Shut down every kernel session of ``lab`` (REST API), so that the next notebook runs
    alone on the machine."""
    headers = {"Authorization": f"token {lab.token}"}
    req = urllib.request.Request(f"{lab.url}/api/sessions", headers=headers)
    with urllib.request.urlopen(req, timeout=30) as r:
        sessions = json.load(r)
    for session in sessions:
        urllib.request.urlopen(urllib.request.Request(
            f"{lab.url}/api/sessions/{session['id']}", headers=headers, method="DELETE"),
            timeout=60).close()


class Browser:
    """One JupyterLab server over a copy of notebooks/, and one Chromium driving it."""

    def __init__(self, workdir: Path, chromium: str):
        from playwright.sync_api import sync_playwright

        self.root = workdir / "root"
        shutil.copytree(ROOT / "notebooks", self.root / "notebooks",
                        ignore=shutil.ignore_patterns(".ipynb_checkpoints", "*.pyc"))
        t0 = time.perf_counter()
        self.lab = Lab(self.root, workdir / "jupyter")
        self._playwright = None
        self.browser = None
        try:
            self.lab.wait_ready(LAB_START_TIMEOUT)
            self.lab_start_s = time.perf_counter() - t0
            self._playwright = sync_playwright().start()
            self.browser = self._playwright.chromium.launch(executable_path=chromium,
                                                            args=CHROMIUM_ARGS)
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        if self.browser is not None:
            self.browser.close()
        if self._playwright is not None:
            self._playwright.stop()
        self.lab.stop()


def _code_uses(notebook: Path, needle: str) -> bool:
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    return any(needle in "".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")


def _slider_changes_image(page, root, selector: str, image, name: str, artifacts: Path,
                          notebook: str) -> dict:
    """Press ArrowRight on the slider ``selector`` inside ``root``; the picture ``image`` (a
    locator, re-queried each time) must get a new src and new pixels."""
    timings = {}
    image.scroll_into_view_if_needed()
    src = image.get_attribute("src")
    pixels = image.screenshot()
    value = _readout(root, selector)
    t = time.perf_counter()
    _move_slider(root, selector, "ArrowRight", presses=1)
    new_src = _wait_new_src(page, image, src, SLIDER_TIMEOUT)
    timings[f"{name}_first_image_s"] = time.perf_counter() - t
    _wait_idle(page, SLIDER_TIMEOUT)
    timings[f"{name}_response_s"] = time.perf_counter() - t
    new_value = _readout(root, selector)
    image.scroll_into_view_if_needed()
    page.screenshot(path=str(artifacts / f"3-moved-{name}.png"))
    assert new_value != value, f"{name} slider did not move ({value})"
    assert new_src != src
    assert image.screenshot() != pixels, \
        f"{name} {value} -> {new_value}: the image src changed but not its pixels"
    problems = _problems_shown(page, notebook)
    assert not problems, f"after moving the {name} slider: {problems}"
    return timings


def _drive_panel(page, artifacts: Path, notebook: str) -> dict:
    """06's GuidancePanel: the guidance slider, then the steps slider, each changes the image."""
    panel = page.locator(PANEL).last
    image = panel.locator(IMAGE).last
    image.wait_for(state="visible", timeout=30_000)
    assert image.get_attribute("src"), "the panel shows no image after Run All"
    timings = {}
    for name, selector in (("guidance", GUIDANCE), ("steps", STEPS)):
        timings.update(_slider_changes_image(page, panel, selector, image, name, artifacts,
                                             notebook))
        error_line = panel.locator(ERROR_LINE)
        if error_line.count():
            text = error_line.last.inner_text().strip()
            assert not text, f"the panel shows an error after the {name} move: {text}"
    return timings


def _drive_interacts(page, artifacts: Path, notebook: str) -> dict:
    """Every ``interact`` with a slider and a picture: one step right changes the picture."""
    boxes = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .widget-interact")
    timings, moved = {}, 0
    for k in range(boxes.count()):
        box = boxes.nth(k)
        if box.locator(".noUi-handle").count() and box.locator("img").count():
            timings.update(_slider_changes_image(page, box, ".widget-slider",
                                                 box.locator("img").last, f"interact{k + 1}",
                                                 artifacts, notebook))
            moved += 1
    assert moved, "the notebook calls interact( but shows no slider with a picture"
    return timings


def _screenshot_outputs(page, artifacts: Path) -> int:
    """One screenshot per code cell with outputs, scrolled into view: cell-NN.png."""
    cells = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell")
    taken = 0
    for k in range(cells.count()):
        cell = cells.nth(k)
        if not cell.locator(".jp-OutputArea-child").count():
            continue
        area = cell.locator(".jp-OutputArea").first
        area.scroll_into_view_if_needed()
        area.screenshot(path=str(artifacts / f"cell-{k:02d}.png"))
        taken += 1
    return taken


def drive_notebook(browser: Browser, notebook: Path, artifacts: Path) -> dict:
    """Open ``notebook`` in JupyterLab, Run All, check what it shows, move its sliders,
    screenshot it; return its timings."""
    shutil.rmtree(artifacts, ignore_errors=True)
    artifacts.mkdir(parents=True)
    lab = browser.lab
    rel = f"notebooks/{notebook.name}"
    timings: dict[str, float] = {}
    outside: list[str] = []
    context = browser.browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(LAB_START_TIMEOUT * 1000)
    page.set_default_navigation_timeout(LAB_START_TIMEOUT * 1000)

    def note_request(request):
        url = request.url
        if not url.startswith((lab.url, "data:", "blob:", "about:")):
            outside.append(url)

    page.on("request", note_request)
    try:
        t = time.perf_counter()
        # a workspace of its own: JupyterLab restores no tab of the notebooks before it
        page.goto(f"{lab.url}/lab/workspaces/{notebook.stem}/tree/{rel}?token={lab.token}")
        page.wait_for_selector(".jp-NotebookPanel .jp-Cell")
        _wait_kernel_ready(page, LAB_START_TIMEOUT)
        timings["notebook_open_s"] = time.perf_counter() - t
        page.screenshot(path=str(artifacts / "1-opened.png"))

        t = time.perf_counter()
        page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
        page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
        _wait_idle(page, RUN_ALL_TIMEOUT)
        timings["run_all_s"] = time.perf_counter() - t
        page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell").first \
            .scroll_into_view_if_needed()
        page.screenshot(path=str(artifacts / "2-ran.png"))
        t = time.perf_counter()  # screenshots first: a failing notebook's are the most useful
        timings["screenshots"] = _screenshot_outputs(page, artifacts)
        timings["screenshots_s"] = time.perf_counter() - t
        problems = _problems_shown(page, notebook.name)
        assert not problems, "after Run All:\n" + "\n".join(problems)
        if _code_uses(notebook, "GuidancePanel("):
            timings.update(_drive_panel(page, artifacts, notebook.name))
        if _code_uses(notebook, "interact("):
            timings.update(_drive_interacts(page, artifacts, notebook.name))
    except Exception as e:
        page.screenshot(path=str(artifacts / "failure.png"))
        raise AssertionError(f"{e}\n--- JupyterLab log (tail) ---\n{lab.tail()}") from e
    finally:
        context.close()
        _shutdown_kernels(lab)
    assert not outside, f"the page requested addresses outside loopback: {outside[:5]}"
    return timings


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium = _chromium_or_skip()
    b = Browser(tmp_path_factory.mktemp("browser"), chromium)
    print(f"\nbrowser test: JupyterLab started in {b.lab_start_s:.1f} s")
    yield b
    b.close()


@pytest.mark.timeout(LAB_START_TIMEOUT * 2 + RUN_ALL_TIMEOUT + 4 * SLIDER_TIMEOUT * 2 + 120)
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_in_browser(notebook, browser, record_property):
    """Run All in JupyterLab: no error, no red output off the allow-list, sliders change the
    picture, screenshots in test-artifacts/browser/<notebook>/ (selection: the module doc)."""
    t = time.perf_counter()
    timings = drive_notebook(browser, notebook, ARTIFACTS / notebook.stem)
    timings["total_s"] = time.perf_counter() - t
    (ARTIFACTS / notebook.stem / "timings.json").write_text(
        json.dumps({k: round(v, 2) for k, v in timings.items()}, indent=1), encoding="utf-8")
    for key, value in timings.items():
        record_property(key, round(value, 2))
    print(f"\n{notebook.stem}: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    assert timings["run_all_s"] > 0 and timings["screenshots"] >= 1


def _collect(env_value: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, SDKIT_BROWSER_NOTEBOOKS=env_value)
    return subprocess.run([sys.executable, "-m", "pytest", "--collect-only",
                           "tests/test_browser.py::test_notebook_in_browser"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_the_selection_deselects_the_others_and_says_so():
    run = _collect("1, 5")
    assert run.returncode == 0, run.stdout + run.stderr
    collected = re.findall(r"test_notebook_in_browser\[(\w+)\]", run.stdout)
    assert [c[:2] for c in collected] == ["01", "05"]
    assert f"{len(NOTEBOOKS) - 2} deselected" in run.stdout
    assert re.search(r"browser test: runs notebooks 01, 05; deselects 00, 02", run.stdout)


def test_a_bad_selection_is_refused():
    run = _collect("5,99")
    assert run.returncode != 0
    assert "SDKIT_BROWSER_NOTEBOOKS='5,99' is not allowed" in run.stdout + run.stderr
