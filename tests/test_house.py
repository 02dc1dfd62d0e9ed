"""House rules of the source tree that a linter does not check."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "inversionview"


def private_imports(root: Path) -> list[str]:
    """``file: name`` for every ``from X import _name`` under ``root`` (``__future__`` and dunders aside)."""
    bad = []
    for p in sorted(root.rglob("*.py")):
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, ast.ImportFrom) and n.module != "__future__":
                bad += [f"{p.relative_to(root)}: {a.name}" for a in n.names if a.name[:1] == "_" and a.name[:2] != "__"]
    return bad


def test_no_private_name_is_imported_from_another_module():
    # a name starting with "_" belongs to its module: what two modules share gets a public name and home
    assert private_imports(SRC) == []


def test_the_private_import_check_finds_one(tmp_path):
    (tmp_path / "a.py").write_text("from __future__ import annotations\nfrom .b import _helper, public\n")
    (tmp_path / "b.py").write_text("from . import __version__\n")
    assert private_imports(tmp_path) == ["a.py: _helper"]


def import_graph(root: Path, package: str = "inversionview") -> dict[str, set[str]]:
    """Module -> the modules of the package it imports, at the top or inside a function (an import that runs only
    for type checkers, under ``if TYPE_CHECKING:``, aside). ``from . import x`` names the module ``x`` where it is
    one, else the package."""
    mods = {}
    for p in sorted(root.rglob("*.py")):
        parts = (package, *p.relative_to(root).with_suffix("").parts)
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        tree = ast.parse(p.read_text())
        typing_only = {
            id(n)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING"
            for n in ast.walk(node)
        }
        for n in ast.walk(tree):
            if id(n) in typing_only or not isinstance(n, ast.ImportFrom):
                continue
            if n.level:
                base = pkg.split(".")[: len(pkg.split(".")) - (n.level - 1)]
                target = ".".join(base + ([n.module] if n.module else []))
            elif n.module and n.module.split(".")[0] == package:
                target = n.module
            else:
                continue
            named = [f"{target}.{a.name}" for a in n.names if f"{target}.{a.name}" in mods]
            for t in named or [target]:
                if t in mods and t != m:
                    graph[m].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: every strongly connected set of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle_in_the_package():
    # lower layers never call back up: a module that needs one above it gets the piece moved down, not an import
    assert cycles(import_graph(SRC)) == []


def test_the_cycle_check_finds_one(tmp_path):
    (tmp_path / "__init__.py").write_text("")
    (tmp_path / "a.py").write_text("def f():\n    from .b import g\n")
    (tmp_path / "b.py").write_text("from .c import h\n")
    (tmp_path / "c.py").write_text(
        "from typing import TYPE_CHECKING\nfrom . import a\nif TYPE_CHECKING:\n    from .b import g\n"
    )
    (tmp_path / "d.py").write_text("from .a import f\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.c"] == {"pkg.a"} and graph["pkg.d"] == {"pkg.a"}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_the_features_are_a_leaf_of_the_reading():
    """features.py holds the feature functions alone: nothing it imports, directly or not, is part of a reading."""
    graph = import_graph(SRC)
    seen, todo = set(), ["inversionview.features"]
    while todo:
        m = todo.pop()
        for t in graph[m] - seen:
            seen.add(t)
            todo.append(t)
    reading = {f"inversionview.{m}" for m in ("propose", "verify", "explore", "dataset", "summary", "preimage", "fcr")}
    assert not seen & reading, sorted(seen & reading)


def test_the_reading_s_stages_only_call_downwards():
    """docs/estimator.md's stages, lowest first: each imports only stages below it, and estimate (the statistics)
    imports nothing of the package. A wrong cut (explore reaching up to the summary, or the shares reaching into
    the chains) fails here."""
    graph = import_graph(SRC)
    stages = ["estimate", "verify", "propose", "explore", "dataset", "summary", "preimage", "fcr"]
    assert graph["inversionview.estimate"] == set()
    for i, m in enumerate(stages):
        above = {f"inversionview.{s}" for s in stages[i + 1 :]}
        assert not graph[f"inversionview.{m}"] & above, (m, sorted(graph[f"inversionview.{m}"] & above))


def api_calls(path: Path) -> list[str]:
    """The calls ``iv.name(...)`` in a module: a stage calling back up into the API object it was handed."""
    tree = ast.parse(path.read_text())
    return [
        f"{path.name}:{n.lineno} iv.{n.func.attr}()"
        for n in ast.walk(tree)
        if isinstance(n, ast.Call)
        and isinstance(n.func, ast.Attribute)
        and isinstance(n.func.value, ast.Name)
        and n.func.value.id == "iv"
    ]


def test_a_reading_never_calls_back_up_into_the_api(tmp_path):
    """InversionView.query resolves the site, the data set and its index; the stages below only read the models off
    ``iv``. The check itself finds a call back up."""
    stages = ["estimate", "verify", "propose", "explore", "dataset", "summary", "preimage"]
    assert [c for m in stages for c in api_calls(SRC / f"{m}.py")] == []
    (tmp_path / "x.py").write_text("def read(iv):\n    return iv.decoder.generate(iv.site_index('a'))\n")
    assert api_calls(tmp_path / "x.py") == ["x.py:2 iv.site_index()"]
