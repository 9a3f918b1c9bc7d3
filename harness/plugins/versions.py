"""Which code an estimator or task runs: its distribution and version, plus a hash of its sources
when the version cannot vouch for them.

The code of a registered object is its *own* module (the class's module, not the plugin module
that registered it) and every module of its own packages that it imports, directly or not (read
from the import statements, those inside functions included): ``source_hash``. A plugin that
registers several estimators, each in its own module, therefore gives each its own identity:
editing one reruns its cells only.

A release installed from a wheel is pinned by ``name version``. An editable install, a module
given with ``--plugin`` and the built-ins of a source checkout change without a version bump, so
their identity adds ``src:<hash>``. A release's source hash is still recorded with every cell
(``sparsebench.code_src.*``), so that a reinstall whose code differs under the same version label
can be told apart from the code that produced stored results (``harness.run.runner`` warns).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import sys
from importlib import metadata
from pathlib import Path
from types import ModuleType

__all__ = ["code_version", "distribution_of", "source_hash"]


@functools.lru_cache(maxsize=1)
def _top_level_owners() -> dict[str, list[str]]:
    return metadata.packages_distributions()


@functools.lru_cache(maxsize=256)
def _tops_of(dist_name: str) -> frozenset[str]:
    """The top-level packages a distribution provides."""
    return frozenset(top for top, names in _top_level_owners().items() if dist_name in names)


def distribution_of(module_name: str) -> metadata.Distribution | None:
    """The installed distribution that provides ``module_name``'s top-level package, if any."""
    names = _top_level_owners().get(module_name.partition(".")[0], [])
    for name in names:
        try:
            return metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _module_of(plugin: object) -> ModuleType | None:
    if isinstance(plugin, ModuleType):
        return plugin
    return sys.modules.get(type(plugin).__module__)


def _locate(name: str) -> Path | None:
    """The source file of module ``name`` (a ``.py`` file or a package's ``__init__.py``), found
    from its loaded top-level package without importing anything."""
    top, *rest = name.split(".")
    module = sys.modules.get(top)
    if module is None:
        return None
    dirs = [Path(p) for p in getattr(module, "__path__", [])]
    if not rest:
        file = getattr(module, "__file__", None)
        return Path(file) if file and file.endswith(".py") else None
    for i, part in enumerate(rest):
        last = i == len(rest) - 1
        found = None
        for folder in dirs:
            if (folder / part).is_dir():
                found = folder / part
                break
            if last and (folder / f"{part}.py").is_file():
                return folder / f"{part}.py"
        if found is None:
            return None
        dirs = [found]
    init = dirs[0] / "__init__.py"
    return init if init.is_file() else None


def _imports(path: Path, name: str) -> tuple[str, ...]:
    """Absolute names that ``path`` (module ``name``) imports; ``from a import b`` gives both
    ``a`` and ``a.b`` (which may be a submodule)."""
    stat = path.stat()
    return _parsed_imports(path, name, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4096)
def _parsed_imports(path: Path, name: str, mtime_ns: int, size: int) -> tuple[str, ...]:
    """``_imports`` for one version of a file (the cache key holds its modification time)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    try:
        tree = ast.parse(path.read_bytes(), str(path))
    except (OSError, SyntaxError, ValueError):
        return ()
    found: list[str] = []
    todo: list[ast.AST] = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            todo += node.orelse  # annotations only: that code never runs
            continue
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found.append(base)
            found += [f"{base}.{alias.name}" for alias in node.names if alias.name != "*"]
        todo += ast.iter_child_nodes(node)
    return tuple(found)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _closure(module_name: str, tops: set[str]) -> dict[str, Path]:
    """Module name -> source file for ``module_name`` and every module of ``tops`` it imports,
    transitively, with the packages that hold them."""
    found: dict[str, Path] = {}
    todo = [module_name]
    while todo:
        name = todo.pop()
        if name in found or name.partition(".")[0] not in tops:
            continue
        path = _locate(name)
        if path is None:
            continue
        found[name] = path
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # packages run their __init__
        todo += list(_imports(path, name))
    return found


def _source_hash(files: dict[str, Path]) -> str:
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + files[name].read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def _is_release(dist: metadata.Distribution, module: ModuleType) -> bool:
    """True when the module's file is one the distribution installed (listed in its wheel
    ``RECORD``), not a source tree's: an editable install, ``PYTHONPATH``, or a checkout whose
    ``*.egg-info`` folder (no ``RECORD``) is found first when the checkout is the working folder."""
    file = getattr(module, "__file__", None)
    if not file or dist.read_text("RECORD") is None:
        return False
    target = Path(file).resolve()
    return any(Path(str(dist.locate_file(f))).resolve() == target for f in dist.files or ())


def source_hash(plugin: object, dist: metadata.Distribution | None = None) -> str:
    """12 hex digits of SHA-256 over the code ``plugin`` runs (its module, or the module of its
    class, and what that imports from its own packages), release or not; ``"unknown"`` without
    a module."""
    module = _module_of(plugin)
    if module is None:
        return "unknown"
    dist = dist or distribution_of(module.__name__)
    tops = {module.__name__.partition(".")[0]}
    if dist is not None:
        tops |= _tops_of(dist.name)
    return _source_hash(_closure(module.__name__, tops))


def code_version(plugin: object, dist: metadata.Distribution | None = None) -> str:
    """``"name version"`` for a released distribution, else that (or ``"module name"``) plus
    ``" src:<12 hex>"``; ``dist`` defaults to the distribution that provides the module.
    ``plugin`` is a module or a registered object (an estimator, a task): the latter is
    identified by its class's module."""
    module = _module_of(plugin)
    if module is None:
        return "unknown"
    dist = dist or distribution_of(module.__name__)
    if dist is not None and _is_release(dist, module):
        return f"{dist.name} {dist.version}"
    label = f"{dist.name} {dist.version}" if dist is not None else f"module {module.__name__}"
    return f"{label} src:{source_hash(module, dist)}"
