"""The exercises' shape: every notebook from 01 on ends with one a learner must solve.

Checked on the notebook files (no kernel): an "Exercise" heading, then the learner's cell,
unsolved and naming its reference solution, then the checker's cell (``solved = ...``); the
solution file exists and differs from the learner's cell. The checkers themselves are tested
with each module (each rejects plausible wrong answers and accepts the reference); the
notebooks run under nbval with the solutions applied (tests/exercise_solutions.py).
"""

import json
import re
from pathlib import Path

import pytest
from exercise_solutions import SOLUTION_RE, transform

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
LESSONS = sorted(p for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb") if not p.name.startswith("00_"))
PLACEHOLDER = re.compile(r"=\s*(None|\.\.\.)\s*(#.*)?$|^\s*\.\.\.\s*$|return (None|\.\.\.)", re.M)


def _exercise(path):
    cells = json.loads(path.read_text())["cells"]
    for k, c in enumerate(cells):
        if c["cell_type"] == "markdown" and re.search(r"^#+ .*exercise", "".join(c["source"]),
                                                      re.I | re.M):
            code = [d for d in cells[k + 1:] if d["cell_type"] == "code"]
            return "".join(cells[k]["source"]), ["".join(d["source"]) for d in code[:2]]
    return None, []


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem[:2])
def test_notebook_has_an_unsolved_exercise_with_solution_and_checker(path):
    if not (NOTEBOOKS / "solutions").is_dir():
        pytest.skip("a handout (make handout): the reference solutions are not here")
    question, code = _exercise(path)
    assert question is not None, f"{path.name}: no '## Exercise' heading"
    assert len(code) == 2, f"{path.name}: expected the learner's cell and the checker's cell"
    learner, checker = code
    m = SOLUTION_RE.match(learner)
    assert m, f"{path.name}: the learner's cell must start with '# Your answer (reference " \
              f"solution: solutions/<name>.py)'; it starts {learner.splitlines()[0]!r}"
    assert PLACEHOLDER.search(learner), f"{path.name}: the learner's cell is not unsolved"
    assert not re.search(r"^\s*return\s+(?!None\b|\.\.\.)\S", learner, re.M), \
        f"{path.name}: the learner's cell returns an answer"
    solution = (NOTEBOOKS / m[1]).read_text(encoding="utf-8")
    assert solution.strip() != learner.strip() and not PLACEHOLDER.search(solution), \
        f"{m[1]} must hold a solved answer"
    assert m[1] == f"solutions/{path.stem}.py", f"{path.name}: solution file should be named " \
                                                f"solutions/{path.stem}.py"
    assert re.match(r"solved = \w+(\.\w+)*\(", checker), \
        f"{path.name}: the checker's cell must be 'solved = <module>.check_...(...)'"


def test_every_solution_file_belongs_to_a_notebook():
    names = {f"{p.stem}.py" for p in LESSONS}
    extra = [p.name for p in (NOTEBOOKS / "solutions").glob("*.py") if p.name not in names]
    assert not extra, f"solution files without a notebook: {extra}"


def test_transform_applies_the_solution_and_asserts_the_checker(tmp_path):
    (tmp_path / "solutions").mkdir()
    (tmp_path / "solutions" / "01_x.py").write_text("answer = 42\n")
    learner = ["# Your answer (reference solution: solutions/01_x.py)\n", "answer = None\n"]
    assert transform(learner, tmp_path) == ["answer = 42\n"]
    checker = ["solved = noising.check(answer)\n"]
    out = transform(checker, tmp_path)
    assert out[:1] == checker and out[-1].startswith("assert solved is True")
    other = ["x = 1\n"]
    assert transform(other, tmp_path) == other
