"""Classroom hygiene: `make lab` works on git-ignored copies of the notebooks (so running them
leaves `git status` clean and `git pull` never conflicts), keeps a learner's edits, and opens
JupyterLab without the news pop-up or an update check (jupyter-config/README.md).

Everything runs in tmp_path (a scratch git repository, a scratch HOME); nothing here touches
the repository's own working tree.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
MAKE = shutil.which("make")
GIT = shutil.which("git")


def run(*args, cwd, check=True, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60, **kw)
    if check:
        assert out.returncode == 0, f"{args}: {out.stdout}\n{out.stderr}"
    return out


def make(target: str, cwd: Path) -> str:
    return run(MAKE, "-s", target, f"PYTHON={sys.executable}", cwd=cwd).stdout


def git_status(repo: Path) -> str:
    return run(GIT, "status", "--porcelain", cwd=repo).stdout


@pytest.fixture
def kit(tmp_path) -> Path:
    """A scratch clone of the kit's hygiene-relevant files: Makefile, .gitignore, notebooks/."""
    repo = tmp_path / "kit"
    repo.mkdir()
    for name in ("Makefile", ".gitignore"):
        shutil.copy2(ROOT / name, repo / name)
    shutil.copytree(ROOT / "notebooks", repo / "notebooks",
                    ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
    run(GIT, "init", "-q", cwd=repo)
    commit(repo)
    return repo


def commit(repo: Path) -> None:
    """Commit everything git does not ignore (as the kit's maintainers would, then `git pull`)."""
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    run(GIT, "add", "-A", cwd=repo, env=env)
    run(GIT, "commit", "-q", "-m", "kit", cwd=repo, env=env)
    assert git_status(repo) == ""


def test_running_a_notebook_from_the_workspace_leaves_git_clean(kit):
    make("workspace", kit)
    copy = kit / "workspace" / "00_start_here.ipynb"
    assert run(GIT, "check-ignore", "-q", str(copy), cwd=kit, check=False).returncode == 0
    # run it where JupyterLab would (cwd = the workspace) and save it, as autosave does; it
    # still finds the kit: sdkit, requirements.txt (next to the sdkit package) and its checks
    nb = nbformat.read(copy, as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(copy.parent)}}).execute()
    nbformat.write(nb, copy)
    (copy.parent / ".ipynb_checkpoints").mkdir(exist_ok=True)  # what JupyterLab adds
    (copy.parent / ".ipynb_checkpoints" / copy.name).write_text(copy.read_text())
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert any("All checks passed" in o.get("text", "") for o in outputs)
    assert not [o for o in outputs if o.output_type == "error"]
    assert git_status(kit) == "", "running a workspace copy changed tracked files"
    # the check can fail: the same save into notebooks/ is what used to dirty the tree
    nbformat.write(nb, kit / "notebooks" / copy.name)
    assert "notebooks/00_start_here.ipynb" in git_status(kit)


def test_every_solution_a_notebook_loads_is_next_to_its_copy(kit):
    make("workspace", kit)
    named = set()  # each learner's cell names its file: `%load solutions/01_forward_noising.py`
    for path in sorted((kit / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        for name in re.findall(r"(?<![\w/])solutions/\d\d_\w+\.py", path.read_text("utf-8")):
            named.add(name)
            assert (kit / "workspace" / name).is_file(), f"{path.name} names {name}: not copied"
    assert len(named) >= 11, f"only {sorted(named)} named in the notebooks"


def test_the_workspace_follows_git_pull_but_keeps_edits(kit):
    ws, nbs = kit / "workspace", kit / "notebooks"
    assert "new" in make("workspace", kit)
    first = sorted(p.name for p in ws.glob("*.ipynb"))
    assert first == sorted(p.name for p in nbs.glob("*.ipynb"))
    edited, untouched = ws / "01_forward_noising.ipynb", ws / "02_reverse_denoising.ipynb"
    edited.write_text(edited.read_text() + " ")  # the learner's edit
    for name in (edited.name, untouched.name):  # a `git pull` changes both notebooks...
        (nbs / name).write_text((nbs / name).read_text() + "\n")
    (nbs / "12_new.ipynb").write_text((nbs / "00_start_here.ipynb").read_text())  # ...adds one
    commit(kit)
    said = make("workspace", kit)
    assert "1 new and 1 updated" in said and f"kept your edited workspace/{edited.name}" in said
    assert edited.read_text().endswith(" ")  # the edit survives
    assert untouched.read_text() == (nbs / untouched.name).read_text()  # the untouched copy follows
    assert (ws / "12_new.ipynb").is_file()
    said = make("reset-notebooks", kit)
    assert edited.read_text() == (nbs / edited.name).read_text()  # fresh copy
    old = [p for p in (kit / "workspace-old").rglob(edited.name)]
    assert len(old) == 1 and old[0].read_text().endswith(" "), "the edited copy was not kept"
    assert git_status(kit) == ""


# ------------------------------------------------------------------------------ JupyterLab


def lab_command() -> list[str]:
    """The `jupyter lab ...` line `make lab` runs (from `make -n`, so the two cannot drift)."""
    out = run(MAKE, "-n", "lab", "NO_BROWSER=--no-browser", "ALLOW_ROOT=--allow-root",
              cwd=ROOT).stdout
    lines = [line for line in out.splitlines() if re.search(r"/jupyter lab ", line)]
    assert len(lines) == 1, out
    return shlex.split(lines[0])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_lab_opens_without_the_news_popup_or_update_check(tmp_path):
    command = lab_command()
    assert command[0].endswith("jupyter") and command[2] == "workspace/"
    (tmp_path / "workspace").mkdir()
    port, token = free_port(), "hygiene-test"
    home = tmp_path / "home"
    env = {**os.environ, "HOME": str(home), "JUPYTER_CONFIG_DIR": str(home / ".jupyter"),
           "JUPYTER_DATA_DIR": str(home / "data"), "JUPYTER_RUNTIME_DIR": str(home / "rt")}
    command[0] = str((ROOT / command[0]).resolve()) if not Path(command[0]).is_absolute() \
        else command[0]
    lab = subprocess.Popen(command + [f"--port={port}", f"--IdentityProvider.token={token}",
                                      "--ServerApp.ip=127.0.0.1"],
                           cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}/lab/api/settings/@jupyterlab/apputils-extension:notification"
        deadline, settings = time.monotonic() + 40, None
        while settings is None and time.monotonic() < deadline and lab.poll() is None:
            try:
                with urllib.request.urlopen(f"{url}?token={token}", timeout=5) as reply:
                    settings = json.load(reply)
            except OSError:
                time.sleep(0.3)
        assert settings is not None, f"JupyterLab did not answer: {lab.poll()}"
        # JupyterLab asks about news on first open when fetchNews is "none" (its default); the
        # kit's overrides.json changes the defaults, and a fresh HOME has no user settings
        defaults = {k: v["default"] for k, v in settings["schema"]["properties"].items()}
        assert defaults["fetchNews"] == "false" and defaults["checkForUpdates"] is False, defaults
        assert "fetchNews" not in settings["settings"], settings["settings"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/lab?token={token}", timeout=10) as r:
            page = r.read().decode()
        config = json.loads(re.search(r'id="jupyter-config-data"[^>]*>(.*?)</script>', page,
                                      re.S).group(1))
        assert config["news"] == {"disabled": True}  # news_url=None: the server fetches no feed
    finally:
        lab.terminate()
        try:
            lab.wait(timeout=15)
        except subprocess.TimeoutExpired:
            lab.kill()
            lab.wait()
