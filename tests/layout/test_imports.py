"""The package boundaries of the design notes, checked on every import statement (including those
inside functions): the plugin contract is the only door between tasks and estimators, the
estimator library is harness-free, and the report reads the store, not the harness."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file; relative imports resolved."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def _violations(folder: str, allowed, forbidden_prefixes: tuple[str, ...]) -> list[str]:
    out = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for line, name in _imports(path):
            if name.startswith(forbidden_prefixes) and not allowed(name):
                out.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    return out


def _contract_only(name: str) -> bool:
    return name == "estimators.base" or name.startswith("estimators.base.")


@pytest.mark.parametrize(
    ("folder", "forbidden", "allowed"),
    [
        # tasks (and their figures) reach estimators through the contract only
        ("plugins", ("estimators.",), _contract_only),
        ("reports", ("harness.",), lambda name: False),
        ("estimators", ("harness.",), lambda name: False),
        # the hyperlayer library stands alone: no contract, no shared layers, no plugins
        (
            "estimators/sparse",
            ("harness.", "estimators.base", "estimators.shared", "estimators.plugins", "plugins."),
            lambda name: False,
        ),
    ],
    ids=["tasks-use-the-contract", "reports-without-harness", "estimators-without-harness",
         "library-stands-alone"],
)
def test_package_boundaries(folder, forbidden, allowed):
    assert _violations(folder, allowed, forbidden) == []
