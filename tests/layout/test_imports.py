"""The package boundaries of the design notes, checked on every import statement (including those
inside functions): the plugin contract is the only door between tasks and estimators, the
estimator library is harness-free, and the report reads the store, not the harness."""

from __future__ import annotations

import ast
import re
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


# ---- the house's rooms (issue 18) ----------------------------------------------------------------

TAG = re.compile(r"\bsparsebench\.[a-z_]")


def _modules(*folders: str) -> list[Path]:
    return [p for folder in folders for p in sorted((ROOT / folder).rglob("*.py"))]


def _strings(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string in a module's code, docstrings left out (prose may name tags)."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def test_the_store_schema_lives_in_one_module():
    """Tag names are spelled in ``reports/schema.py`` only; writer and readers import them.
    (A file format id such as ``sparsebench.sorting.quicksort_steps/2`` is not a tag.)"""
    schema = ROOT / "reports" / "schema.py"
    spelled = [
        f"{path.relative_to(ROOT)}:{line} spells {text!r}"
        for path in _modules("harness", "reports", "plugins", "estimators")
        if path != schema
        for line, text in _strings(path)
        if TAG.search(text) and "/" not in text
    ]
    assert spelled == []


def test_the_cli_builds_no_backend():
    """``cli.py`` parses; ``harness.backends.choice`` picks and builds the backend."""
    cli = ROOT / "harness" / "cli.py"
    built = [
        f"cli.py:{line} imports {name}"
        for line, name in _imports(cli)
        if name.startswith("harness.backends.") and not name.startswith("harness.backends.choice.")
        or name.rsplit(".", 1)[-1].endswith("Backend")
    ]
    assert built == []


def _calls(path: Path, attribute: str) -> list[int]:
    """Lines that call ``<something>.<attribute>(...)``."""
    return [
        node.lineno
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == attribute
    ]


def _builds_optimiser(path: Path) -> bool:
    """Whether a module calls ``torch.optim.<X>(...)`` (or ``optim.<X>(...)``)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            if isinstance(owner, ast.Attribute) and owner.attr == "optim" or isinstance(owner, ast.Name) \
                    and owner.id == "optim":
                return True
    return False


def test_the_training_loop_exists_once():
    """Only ``harness/run/loop.py`` builds an optimiser and steps it; eval mode for evaluation is
    entered through ``harness.task.evaluating`` alone, never toggled by the runner or a task."""
    loop = ROOT / "harness" / "run" / "loop.py"
    modules = _modules("harness", "plugins")
    assert [p.relative_to(ROOT) for p in modules if _builds_optimiser(p)] == [loop.relative_to(ROOT)]
    assert [p.relative_to(ROOT) for p in modules if _calls(p, "zero_grad")] == [loop.relative_to(ROOT)]
    toggles = [
        f"{path.relative_to(ROOT)}:{line}"
        for path in _modules("harness/run", "plugins")
        for line in _calls(path, "eval")
    ]
    assert toggles == []


def test_at_most_a_dozen_modules_at_harness_top_level():
    top = sorted(p.name for p in (ROOT / "harness").glob("*.py") if p.name != "__init__.py")
    assert len(top) <= 12, top
