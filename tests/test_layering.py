"""The layering rule of sdkit/__init__.py, read from the source (ast), never by importing it.

The rule: the ground (``GROUND``, bottom first) imports only ground modules before it; a
notebook's module (``NOTEBOOK_MODULES``: notebook number -> its modules, in order) imports only
the ground, modules of lower-numbered notebooks and the modules listed before it for its own
notebook. Every module is listed exactly once; no import cycle; every sdkit import sits at the
top of its module, never inside a function; no module is over 500 lines. Notebooks follow the
same order: notebook n imports its own modules and none of a later notebook's.

``layer_problems`` is the checker; the last tests feed it small bad packages to show that it
rejects each kind of break (so a passing run means something).
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SDKIT = ROOT / "sdkit"
NOTEBOOKS = ROOT / "notebooks"
MAX_LINES = 500
PACKAGE = "__init__"  # the package namespace itself (`import sdkit`, `from sdkit import X`)
# The one sdkit import allowed inside a function: sdkit/__init__.py's PEP 562 ``__getattr__``,
# which keeps `import sdkit` free of diffusers until `sdkit.load_pipeline` is looked up.
LAZY_OK = {(PACKAGE, "__getattr__", "pipeline")}


@dataclass(frozen=True)
class Import:
    target: str  # an sdkit module name, or PACKAGE
    line: int
    function: str | None  # the enclosing function, None at module level


# ------------------------------------------------------------------------------ reading


def read_layers(init: Path) -> tuple[tuple[str, ...], dict[int, tuple[str, ...]]]:
    """``GROUND`` and ``NOTEBOOK_MODULES`` as literals from ``sdkit/__init__.py``."""
    found = {}
    for node in ast.parse(init.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Name) and t.id in ("GROUND", "NOTEBOOK_MODULES"):
                    found[t.id] = ast.literal_eval(node.value)
    assert set(found) == {"GROUND", "NOTEBOOK_MODULES"}, (
        f"{init} must define GROUND and NOTEBOOK_MODULES as literals; found {sorted(found)}")
    return tuple(found["GROUND"]), {int(k): tuple(v) for k, v in found["NOTEBOOK_MODULES"].items()}


def _targets(node, modules: set[str]) -> list[str]:
    """The sdkit modules an import statement (or importlib.import_module call) reaches."""
    if isinstance(node, ast.Import):
        out = []
        for a in node.names:
            parts = a.name.split(".")
            if parts[0] == "sdkit":
                out.append(parts[1] if len(parts) > 1 else PACKAGE)
        return out
    if isinstance(node, ast.ImportFrom):
        if node.level == 0 and not (node.module or "").split(".")[0] == "sdkit":
            return []
        if node.level > 1:
            return ["<outside the package>"]
        parts = (node.module or "").split(".")
        if node.level == 0:
            parts = parts[1:]  # drop "sdkit"
        if parts and parts[0]:
            return [parts[0]]
        # `from . import a, b` / `from sdkit import a, X`: modules by name, else the namespace
        return [a.name if a.name in modules else PACKAGE for a in node.names]
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module" and node.args
            and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        name = node.args[0].value
        if name.startswith("."):
            return [name.lstrip(".").split(".")[0] or PACKAGE]
        if name.split(".")[0] == "sdkit":
            parts = name.split(".")
            return [parts[1] if len(parts) > 1 else PACKAGE]
    return []


def read_imports(source: str, modules: set[str], this: str) -> list[Import]:
    """Every sdkit import in one module's source, with the function it sits in (if any)."""
    tree = ast.parse(source)
    enclosing: dict[ast.AST, str] = {}
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for inner in ast.walk(fn):
                enclosing.setdefault(inner, getattr(fn, "name", "<lambda>"))
    return [Import(t, node.lineno, enclosing.get(node))
            for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom, ast.Call))
            for t in _targets(node, modules) if t != this]


def read_package(folder: Path) -> tuple[dict[str, list[Import]], dict[str, int]]:
    """{module: its sdkit imports} and {module: lines} for every .py file of the package."""
    files = {p.stem: p for p in sorted(folder.glob("*.py"))}
    names = set(files) - {PACKAGE}
    imports, sizes = {}, {}
    for name, path in files.items():
        source = path.read_text(encoding="utf-8")
        imports[name] = read_imports(source, names, name)
        sizes[name] = len(source.splitlines())
    return imports, sizes


# ------------------------------------------------------------------------------ the checker


def _rank(ground, notebooks) -> dict[str, tuple[int, int]]:
    """Module -> (layer, position): the ground is layer -1; notebook n is layer n."""
    rank = {m: (-1, i) for i, m in enumerate(ground)}
    for n, mods in notebooks.items():
        for j, m in enumerate(mods):
            rank.setdefault(m, (n, j))
    return rank


def may_import(rank, importer: str, target: str) -> bool:
    if importer == PACKAGE:  # the namespace re-exports the ground only
        return rank.get(target, (99,))[0] == -1
    if target not in rank or importer not in rank:
        return False
    (li, pi), (lt, pt) = rank[importer], rank[target]
    if li == -1:
        return lt == -1 and pt < pi
    return lt == -1 or lt < li or (lt == li and pt < pi)


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), plus self-loops."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


def layer_problems(imports: dict[str, list[Import]], sizes: dict[str, int], ground,
                   notebooks, max_lines: int = MAX_LINES) -> dict[str, list[str]]:
    """Every break of the rule, by kind: listing, order, cycle, inside_function, size."""
    problems = {k: [] for k in ("listing", "order", "cycle", "inside_function", "size")}
    listed = list(ground) + [m for n in sorted(notebooks) for m in notebooks[n]]
    modules = set(imports) - {PACKAGE}
    for m in sorted(set(listed)):
        if listed.count(m) > 1:
            problems["listing"].append(f"{m} is listed {listed.count(m)} times")
    for m in sorted(modules - set(listed)):
        problems["listing"].append(f"sdkit/{m}.py is in neither GROUND nor NOTEBOOK_MODULES")
    for m in sorted(set(listed) - modules):
        problems["listing"].append(f"{m} is listed but sdkit/{m}.py does not exist")
    rank = _rank(ground, notebooks)
    for m in sorted(imports):
        for imp in imports[m]:
            where = f"sdkit/{m}.py:{imp.line}"
            if imp.target == PACKAGE and m != PACKAGE:
                problems["order"].append(
                    f"{where} imports the sdkit namespace; import the module that defines it")
            elif imp.target != PACKAGE and not may_import(rank, m, imp.target):
                problems["order"].append(
                    f"{where}: {m} {rank.get(m, '(unlisted)')} may not import {imp.target} "
                    f"{rank.get(imp.target, '(unlisted)')}")
            if imp.function is not None and (m, imp.function, imp.target) not in LAZY_OK:
                problems["inside_function"].append(
                    f"{where}: sdkit import of {imp.target} inside {imp.function}()")
    edges = {m: {i.target for i in imps if i.target != PACKAGE} for m, imps in imports.items()
             if m != PACKAGE}
    problems["cycle"] = [" -> ".join(c) for c in find_cycles(edges)]
    problems["size"] = [f"sdkit/{m}.py has {n} lines (at most {max_lines})"
                        for m, n in sorted(sizes.items()) if n > max_lines]
    return problems


# ------------------------------------------------------------------------------ the package


@pytest.fixture(scope="module")
def package():
    ground, notebooks = read_layers(SDKIT / "__init__.py")
    imports, sizes = read_package(SDKIT)
    return ground, notebooks, imports, sizes, layer_problems(imports, sizes, ground, notebooks)


def test_the_rule_is_stated_as_expected(package):
    ground, notebooks, *_ = package
    assert ground == ("checks", "threads", "device", "images", "figures", "shapes", "pipeline")
    assert sorted(notebooks) == list(range(1, 13)), "one entry per notebook 01..12"
    assert all(isinstance(mods, tuple) and mods for mods in notebooks.values())


@pytest.mark.parametrize("kind", ["listing", "order", "cycle", "inside_function", "size"])
def test_package_follows_the_rule(package, kind):
    problems = package[-1][kind]
    assert not problems, "\n".join(problems)


def test_the_reader_sees_the_imports(package):
    """Guards the checker itself: the ground is really read (pipeline imports checks)."""
    _, _, imports, sizes, _ = package
    assert {"checks", "device", "images", "shapes", "pipeline"} <= set(imports)
    assert "checks" in {i.target for i in imports["pipeline"]}
    assert all(n > 0 for n in sizes.values())


# ------------------------------------------------------------------------------ the notebooks


def _notebook_imports(path: Path) -> set[str]:
    """sdkit modules a notebook's code cells import (`from sdkit import a, b`, `sdkit.a`)."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    code = re.sub(r"\(\s*([^)]*)\)", lambda m: m.group(1).replace("\n", " "), code)
    found = set(re.findall(r"^\s*(?:from|import)\s+sdkit\.(\w+)", code, re.M))
    for names in re.findall(r"^\s*from\s+sdkit\s+import\s+([^\n#]+)", code, re.M):
        found.update(n.split(" as ")[0].strip() for n in names.split(","))
    return found


def _notebook_files() -> dict[int, Path]:
    return {int(p.name[:2]): p for p in sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))}


@pytest.mark.parametrize("number", sorted(_notebook_files()))
def test_notebook_imports_its_modules_and_nothing_later(package, number):
    ground, notebooks, imports, _, _ = package
    rank = _rank(ground, notebooks)
    used = _notebook_imports(_notebook_files()[number]) & set(imports)
    missing = set(notebooks.get(number, ())) - used
    assert not missing, f"notebook {number:02d} does not import its module(s) {sorted(missing)}"
    later = sorted(m for m in used if rank.get(m, (-1,))[0] > number)
    assert not later, f"notebook {number:02d} imports later notebooks' modules {later}"


def test_every_notebook_module_has_its_notebook(package):
    _, notebooks, _, _, _ = package
    files = _notebook_files()
    assert set(notebooks) <= set(files), f"no notebook for {sorted(set(notebooks) - set(files))}"


# ------------------------------------------------------------------------------ the checker fails


GROUND_T = ("checks", "device", "images", "shapes", "pipeline")
NOTEBOOKS_T = {1: ("noising",), 2: ("sampling",), 9: ("finetune", "lora")}
GOOD = {
    "__init__": "from .device import get_device\n",
    "checks": '"""checks"""\n',
    "device": "from . import checks\n",
    "images": "from .checks import fail\nfrom .device import get_device\n",
    "shapes": "from . import checks, images\n",
    "pipeline": "import sdkit.checks\nfrom sdkit.images import encode\n",
    "noising": "from . import images, pipeline\n",
    "sampling": "from . import noising\n",
    "finetune": "from .sampling import sample\n",
    "lora": "from . import finetune, noising\n",
}


def _check(sources: dict[str, str], ground=GROUND_T, notebooks=NOTEBOOKS_T, max_lines=MAX_LINES):
    names = set(sources) - {PACKAGE}
    imports = {m: read_imports(src, names, m) for m, src in sources.items()}
    sizes = {m: len(src.splitlines()) for m, src in sources.items()}
    return layer_problems(imports, sizes, ground, notebooks, max_lines)


def test_checker_accepts_a_good_package():
    assert not any(_check(GOOD).values()), _check(GOOD)


@pytest.mark.parametrize("kind, change", [
    ("order", {"checks": "from . import device\n"}),  # ground imports a later ground module
    ("order", {"images": "from .noising import add_noise\n"}),  # ground imports a notebook's
    ("order", {"noising": "from sdkit import sampling\n"}),  # a higher notebook's module
    ("order", {"finetune": "from . import lora\n"}),  # a later module of its own notebook
    ("order", {"sampling": "import sdkit\n"}),  # the namespace hides what it uses
    ("order", {"shapes": "from .. import something\n"}),  # outside the package
    ("inside_function", {"sampling": "def f():\n    from . import noising\n"}),
    ("inside_function", {"sampling": "def f():\n    import sdkit.noising\n"}),
    ("inside_function", {"lora": "class A:\n    def f(self):\n        from .finetune import x\n"}),
    ("inside_function", {"noising": "import importlib\ndef f():\n"
                                    "    return importlib.import_module('.images', 'sdkit')\n"}),
    ("cycle", {"checks": "from . import pipeline\n"}),
    ("size", {"shapes": "x = 1\n" * (MAX_LINES + 1)}),
    ("listing", {"extra": "from . import checks\n"}),  # a module in no layer
])
def test_checker_rejects(kind, change):
    problems = _check({**GOOD, **change})
    assert problems[kind], f"{kind} not caught: {problems}"


def test_checker_rejects_a_module_listed_twice_or_missing():
    twice = _check(GOOD, notebooks={**NOTEBOOKS_T, 2: ("sampling", "noising")})
    assert any("listed 2 times" in p for p in twice["listing"])
    missing = _check(GOOD, notebooks={**NOTEBOOKS_T, 3: ("attention",)})
    assert any("attention is listed" in p for p in missing["listing"])


def test_cycle_finder_finds_a_cycle_outside_the_layers():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
