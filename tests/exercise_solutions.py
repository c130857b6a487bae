"""Run the notebooks with the reference solutions applied (test-only; the kernel startup file
that tests/conftest.py writes installs it in every notebook kernel of a test run).

A notebook's exercise has two cells after its "Exercise" heading:

- the learner's cell, unsolved (``answer = None``), whose first line names its reference
  solution: ``# Your answer (reference solution: solutions/01_forward_noising.py)``;
- the checker's cell, ``solved = <module>.check_...(answer)``: it prints what is right or
  wrong and returns a bool, so an unsolved notebook still runs top to bottom.

With ``SDKIT_APPLY_SOLUTIONS=1`` (conftest's default) an IPython input transformer replaces
the learner's cell by the solution file before it runs, and adds ``assert solved is True``
to the checker's cell, so CI proves that every reference solution passes its checker.
``SDKIT_APPLY_SOLUTIONS=0`` runs the notebooks as a learner gets them.
"""

import re
from pathlib import Path

SOLUTION_RE = re.compile(r"\A# Your answer \(reference solution: (solutions/\w+\.py)\)")
CHECKER_RE = re.compile(r"^solved = ", re.M)


def transform(lines: list[str], notebooks_dir: Path) -> list[str]:
    """The cell as CI runs it: the learner's cell becomes its solution; the checker asserts."""
    source = "".join(lines)
    m = SOLUTION_RE.match(source)
    if m:
        return (notebooks_dir / m[1]).read_text(encoding="utf-8").splitlines(keepends=True)
    if CHECKER_RE.search(source):
        return [*lines, "\n", "assert solved is True, 'the reference solution did not pass'\n"]
    return lines


def install(ip, notebooks_dir) -> None:
    """Register ``transform`` with the IPython shell ``ip``."""
    notebooks_dir = Path(notebooks_dir)
    ip.input_transformers_post.append(lambda lines: transform(lines, notebooks_dir))
