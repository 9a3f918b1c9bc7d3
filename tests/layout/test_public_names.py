"""Every public name defined in ``estimators/`` is defined once, so that a name says which thing it
is (two ``SparseGlimpse`` classes, or two ``duplicate_mask`` functions meaning different things,
made readers and imports guess). Hook implementations share their hook's name by design."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _is_hookimpl(node: ast.AST) -> bool:
    decorators = getattr(node, "decorator_list", [])
    return any(isinstance(d, ast.Name) and d.id == "hookimpl" for d in decorators)


def _public_definitions(path: Path) -> list[str]:
    """Top-level classes, functions and assigned names of a module not starting with ``_``."""
    names = []
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not _is_hookimpl(node):
            names.append(node.name)
        elif isinstance(node, ast.Assign):
            names += [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.append(node.target.id)
    return [name for name in names if not name.startswith("_")]


def test_estimators_define_each_public_name_once():
    where: dict[str, list[str]] = defaultdict(list)
    for path in sorted((ROOT / "estimators").rglob("*.py")):
        for name in _public_definitions(path):
            where[name].append(str(path.relative_to(ROOT)))
    assert {name: paths for name, paths in where.items() if len(paths) > 1} == {}
