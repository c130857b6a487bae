"""A clean screen: what a notebook may show on stderr, and the check that enforces it.

Learners read red as broken, so no library warning reaches a notebook's output unless it
teaches something (issue 16). The check runs inside the nbval run that ``make test`` already
does (the repository's conftest.py hooks every notebook cell, no second run) and in the
browser test (tests/test_browser.py, on the red output areas JupyterLab shows). A cell fails
when it shows

- any **stderr** stream output (JupyterLab's red box) with a line that no entry of
  ``ALLOWED`` below accepts, or
- text that **looks like a Python warning** (``UserWarning: ...``, ``path.py:12:
  FutureWarning: ...``, a library's ``[transformers] ...`` logging line) in any other output
  (stdout, a displayed value), allowed or not by the same list.

How to read a failure: the message quotes the offending lines. Fix the cause (install what
the warning asks for, pass the argument it wants, silence that one warning where sdkit loads
the library, with a comment why); put a line on ``ALLOWED`` only when it teaches something
or cannot be fixed, with its reason next to it.

Progress bars (tqdm): sdkit and diffusers use ``tqdm.auto``, which in a Jupyter kernel is a
widget bar (a display_data output, never stderr), so progress bars are not on this list: a
text bar on stderr means something used plain ``tqdm`` and shows a red box; use
``tqdm.auto`` instead, and only for work that takes seconds (``delay=`` or ``disable=`` for
quick calls, as sdkit.pipeline does). The line ``PROGRESS_BAR`` recognises such a bar, so the
failure message can say so.

Used by: conftest.py (the nbval hook), tests/test_browser.py, tests/test_clean_screen.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatch


@dataclass(frozen=True)
class Allowed:
    """One accepted stderr line: ``notebooks`` (a glob on the notebook's file name), ``line``
    (a regular expression the whole line must match) and ``why`` (the reason it stays)."""

    notebooks: str
    line: str
    why: str

    def accepts(self, notebook: str, text: str) -> bool:
        return fnmatch(notebook, self.notebooks) and re.fullmatch(self.line, text) is not None


# The allow-list. Each entry says why the line stays on a learner's screen.
ALLOWED: tuple[Allowed, ...] = (
    # Empty on purpose. Surveyed 2026-12-02 (every notebook under nbval and in the browser):
    # each stderr line had a cause to fix instead (transformers' torchvision notice: dropped in
    # sdkit/__init__.py; diffusers' safety-checker licence notice for the toy model, which has
    # no safety checker; the tokenizer's "indexing errors" notice in 04: fixed in sdkit).
    # An entry looks like:
    # Allowed("09_*", r"some line the lesson explains", "why a learner should see it"),
)

# "SomethingWarning: message", with or without warnings.showwarning's "file.py:12: " prefix,
# and a library logger's "[transformers] ..." / "[diffusers] ..." prefix
WARNING_LINE = re.compile(
    r"(?:^|\s)(?:[\w.]+\.)?[A-Z]\w*Warning: |^\[(?:transformers|diffusers|huggingface_hub|"
    r"accelerate|peft|torch)\] ", re.MULTILINE)
# tqdm's text bar: "desc: 40%|####      | 4/10 [00:01<00:02, 3.1it/s]"
PROGRESS_BAR = re.compile(r"\d+%\|.*\| *[\d.]+[kM]?/[\d.?]+[kM]? \[")


def _lines(text: str) -> list[str]:
    # a carriage return redraws the line (tqdm): keep what is left on screen
    return [line.rsplit("\r", 1)[-1].rstrip() for line in text.split("\n")]


def _output_texts(output: dict) -> tuple[str, str]:
    """(kind, text) of one nbformat output: kind is 'stderr', 'stdout' or 'data'."""
    kind = output.get("output_type")
    if kind == "stream":
        return output.get("name", "stdout"), output.get("text", "")
    if kind in ("display_data", "execute_result"):
        data = output.get("data", {})
        return "data", data.get("text/plain", "") if isinstance(data, dict) else ""
    return str(kind), ""


def offending(outputs, notebook: str, allowed=ALLOWED) -> list[str]:
    """The lines of ``outputs`` (one cell's nbformat outputs, as nbval collects them) that a
    clean screen does not allow, each prefixed with where it was shown ('stderr: ...')."""
    bad = []
    for output in outputs or ():
        kind, text = _output_texts(output)
        if kind == "stderr":
            bad += [f"stderr: {line}" for line in _lines(text)
                    if line.strip() and not any(a.accepts(notebook, line) for a in allowed)]
        elif text:
            bad += [f"{kind} (looks like a warning): {line}" for line in _lines(text)
                    if WARNING_LINE.search(line)
                    and not any(a.accepts(notebook, line) for a in allowed)]
    return bad


def offending_text(texts, notebook: str, allowed=ALLOWED) -> list[str]:
    """The same check on the text of red output areas as a browser shows them."""
    return offending([{"output_type": "stream", "name": "stderr", "text": t} for t in texts],
                     notebook, allowed)


def explain(bad: list[str], notebook: str) -> str:
    """The failure message: the offending lines, what they are, and where the list is."""
    shown = "\n".join(f"    {line[:300]}" for line in bad[:20])
    more = f"\n    ... and {len(bad) - 20} more" if len(bad) > 20 else ""
    bar = ("\n  A text progress bar on stderr: use tqdm.auto (a widget bar in Jupyter), and only "
           "for work that takes seconds." if any(PROGRESS_BAR.search(b) for b in bad) else "")
    return (f"{notebook} shows output a learner would read as an error (a clean screen, issue "
            f"16):\n{shown}{more}{bar}\n  Fix the cause, or, if it teaches something or cannot "
            "be fixed, add a commented entry to ALLOWED in tests/allowed_output.py.")
