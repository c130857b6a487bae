"""Footers that tell the truth: "Introduced in notebooks/NN_name.ipynb." in sdkit docstrings.

Every such footer (on a module, class, function or method) names a notebook that exists and
whose code cells mention the documented name (as a whole word); every public top-level
function and class of a notebook's module (``sdkit.NOTEBOOK_MODULES``) ends its docstring with
one. Read from the source with ast: nothing is executed.
"""

from __future__ import annotations

import ast
import json
import re
from functools import cache
from pathlib import Path

import pytest

from sdkit import NOTEBOOK_MODULES

ROOT = Path(__file__).resolve().parents[1]
SDKIT = ROOT / "sdkit"
NOTEBOOKS = ROOT / "notebooks"
FOOTER = re.compile(r"Introduced in (notebooks/[^\s]+?\.ipynb)")
ENDING = re.compile(r"Introduced in notebooks/\d\d_\w+\.ipynb\.$")


@cache
def notebook_code(relative: str) -> str | None:
    """The code cells of notebooks/NN_name.ipynb joined, or None when there is no such file."""
    path = ROOT / relative
    if not path.is_file():
        return None
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


def documented(path: Path):
    """(qualified name, name, docstring, is public top-level) for the module and each def/class."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    yield path.stem, path.stem, ast.get_docstring(tree) or "", False
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node.name, node.name, ast.get_docstring(node) or "", not node.name.startswith("_")
            if isinstance(node, ast.ClassDef):
                for sub in node.body:
                    if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        yield (f"{node.name}.{sub.name}", sub.name,
                               ast.get_docstring(sub) or "", False)


def footer_problems(module: str, entries, code_of=notebook_code, needs_footer=False) -> list[str]:
    """What is wrong with one module's footers (see the module docstring)."""
    problems = []
    for qualname, name, doc, public in entries:
        where = f"sdkit/{module}.py {qualname}"
        for notebook in FOOTER.findall(doc):
            code = code_of(notebook)
            if code is None:
                problems.append(f"{where}: names {notebook}, which does not exist")
            elif not re.search(rf"\b{re.escape(name)}\b", code):
                problems.append(f"{where}: {notebook}'s code cells never mention {name}")
        if needs_footer and public and not ENDING.search(doc.strip()):
            problems.append(f"{where}: the docstring does not end with "
                            "'Introduced in notebooks/NN_name.ipynb.'")
    return problems


NOTEBOOK_MODULE_NAMES = {m for mods in NOTEBOOK_MODULES.values() for m in mods}


@pytest.mark.parametrize("path", sorted(SDKIT.glob("*.py")), ids=lambda p: p.stem)
def test_footers_name_a_notebook_that_uses_the_name(path):
    problems = footer_problems(path.stem, list(documented(path)),
                               needs_footer=path.stem in NOTEBOOK_MODULE_NAMES)
    assert not problems, "\n".join(problems)


def test_there_are_footers_to_check():
    """Guards against a reader that finds nothing (and so passes)."""
    found = sum(len(FOOTER.findall(doc)) for p in SDKIT.glob("*.py")
                for _, _, doc, _ in documented(p))
    assert found >= 50, f"only {found} footers found in sdkit/"


# ------------------------------------------------------------------------------ the check fails


def _fake_code(notebook):
    return {"notebooks/01_a.ipynb": "x = mix_noise(a)\nnoise_level_of(3)"}.get(notebook)


@pytest.mark.parametrize("entry, wrong", [
    (("f", "mix", "Does.\n\nIntroduced in notebooks/01_a.ipynb.", True), "never mention"),
    (("g", "g", "Does.\n\nIntroduced in notebooks/02_b.ipynb.", True), "does not exist"),
    (("h", "h", "Does, with no footer.", True), "does not end with"),
    (("k", "noise_level_of", "Introduced in notebooks/01_a.ipynb (and 05).", True),
     "does not end with"),
])
def test_checker_rejects(entry, wrong):
    problems = footer_problems("m", [entry], code_of=_fake_code, needs_footer=True)
    assert len(problems) == 1 and wrong in problems[0], problems


def test_checker_accepts_a_true_footer():
    entries = [("mix_noise", "mix_noise", "Does.\n\nIntroduced in notebooks/01_a.ipynb.", True),
               ("_private", "_private", "No footer needed.", False)]
    assert footer_problems("m", entries, code_of=_fake_code, needs_footer=True) == []
