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
