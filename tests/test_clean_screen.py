"""The clean-screen check (tests/allowed_output.py, hooked into nbval by conftest.py) can fail:
it flags stderr and warnings, accepts only what its allow-list names, and the hook fails a
real nbval cell that writes to stderr while passing a quiet one."""

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import allowed_output
from allowed_output import ALLOWED, Allowed, explain, offending, offending_text

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_NAMES = sorted(p.name for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def _stream(name, text):
    return {"output_type": "stream", "name": name, "text": text}


def test_stderr_is_flagged_and_quoted():
    out = [_stream("stdout", "model: the kit toy model\n"),
           _stream("stderr", "[transformers] `CLIPImageProcessor` requires torchvision\n")]
    bad = offending(out, "01_forward_noising.ipynb", allowed=())
    assert bad == ["stderr: [transformers] `CLIPImageProcessor` requires torchvision"]
    message = explain(bad, "01_forward_noising.ipynb")
    assert "CLIPImageProcessor" in message and "tests/allowed_output.py" in message


def test_an_allowed_line_passes_only_where_it_is_allowed():
    allowed = (Allowed("08_*", r"note: .* is slow on a CPU", "a test entry"),)
    out = [_stream("stderr", "note: this step is slow on a CPU\n\n")]
    assert offending(out, "08_image_to_image.ipynb", allowed) == []
    assert offending(out, "01_forward_noising.ipynb", allowed) == [
        "stderr: note: this step is slow on a CPU"]
    # the whole line must match, not a part of it
    longer = [_stream("stderr", "note: this step is slow on a CPU, and broken\n")]
    assert offending(longer, "08_image_to_image.ipynb", allowed) != []


def test_warnings_in_other_outputs_are_flagged():
    warned = [_stream("stdout", "/x/y.py:12: FutureWarning: `foo` is deprecated\n"),
              {"output_type": "execute_result", "execution_count": 1,
               "data": {"text/plain": "UserWarning: careful"}, "metadata": {}}]
    bad = offending(warned, "04_text_and_cross_attention.ipynb", allowed=())
    assert len(bad) == 2 and "FutureWarning" in bad[0] and "UserWarning" in bad[1]
    quiet = [_stream("stdout", "a Warning sign is not a warning: 3 shapes\n"),
             {"output_type": "display_data", "data": {"image/png": "iVBOR"}, "metadata": {}}]
    assert offending(quiet, "04_text_and_cross_attention.ipynb", allowed=()) == []


def test_a_text_progress_bar_on_stderr_is_flagged_with_a_hint():
    bar = _stream("stderr", "steps:  50%|#####     | 5/10 [00:01<00:01, 4.2it/s]\r"
                            "steps: 100%|##########| 10/10 [00:02<00:00, 4.3it/s]\n")
    bad = offending([bar], "02_reverse_denoising.ipynb", allowed=())
    assert bad == ["stderr: steps: 100%|##########| 10/10 [00:02<00:00, 4.3it/s]"]
    assert "tqdm.auto" in explain(bad, "02_reverse_denoising.ipynb")


def test_browser_text_uses_the_same_list():
    allowed = (Allowed("*", r"ok line", "a test entry"),)
    assert offending_text(["ok line\n", "bad line"], "05_x.ipynb", allowed) == ["stderr: bad line"]


def test_every_allow_list_entry_is_explained_and_used_by_a_notebook():
    for entry in ALLOWED:
        re.compile(entry.line)
        assert len(entry.why.split()) >= 5, f"{entry} needs a reason"
        assert any(allowed_output.fnmatch(n, entry.notebooks) for n in NOTEBOOK_NAMES), \
            f"{entry.notebooks!r} matches no notebook in notebooks/"


NOTEBOOK = {
    "cells": [
        {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
         "source": "import sys\nprint('all is well')"},
        {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
         "source": "print('something went red', file=sys.stderr)"},
        {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
         "source": "import warnings\nwarnings.warn('mind the gap')"},
    ],
    "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                "language": "python"}},
    "nbformat": 4, "nbformat_minor": 5,
}


def test_the_nbval_hook_fails_a_cell_that_writes_to_stderr(tmp_path):
    """A throw-away notebook under nbval with the repository's conftest.py hook: the quiet
    cell passes, the stderr cell and the warning cell fail with their text quoted."""
    (tmp_path / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
    (tmp_path / "conftest.py").write_text(textwrap.dedent(f"""\
        import importlib.util
        spec = importlib.util.spec_from_file_location("sdkit_root_conftest",
                                                      {str(ROOT / "conftest.py")!r})
        root = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(root)
        pytest_runtest_call = root.pytest_runtest_call
        pytest_unconfigure = root.pytest_unconfigure
        """), encoding="utf-8")
    (tmp_path / "scratch.ipynb").write_text(json.dumps(NOTEBOOK), encoding="utf-8")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax",
         "--nbval-current-env", "--nbval-cell-timeout=120", "scratch.ipynb"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    assert re.search(r"2 failed, 1 passed", out), out
    assert "stderr: something went red" in out
    assert "UserWarning: mind the gap" in out
    assert "tests/allowed_output.py" in out
