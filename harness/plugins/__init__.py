"""The plugin manager: built-ins, the ``sparsebench`` entry-point group, ``--plugin`` and
``SPARSEBENCH_PLUGINS``, all loaded through the same hooks and validated in one place.

Loading is strict, as a plugin author needs it to be: a hook name the contract does not know, a
function named like a hook but missing ``@hookimpl``, an import error or an invalid registration
is one ``PluginError`` naming the plugin and where it came from. Any plugin can be switched off by
name (``-p no:NAME``, ``SPARSEBENCH_DISABLE_PLUGINS``) so that a broken installed one never
blocks a command.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any

import pluggy

from estimators.base import Estimator
from estimators.params import kinds_problem
from harness import hookspecs
from harness.errors import PluginError
from harness.plugins.versions import code_version, source_hash
from harness.task import Task

__all__ = [
    "DEFAULT_PLUGINS",
    "DISABLE_ENV_VAR",
    "DISABLE_PREFIX",
    "NAME",
    "ENTRY_POINT_GROUP",
    "ENV_VAR",
    "HOOKS",
    "Registered",
    "Registry",
    "load",
]

#: Built-in plugins, loaded through the very hooks third-party plugins use.
DEFAULT_PLUGINS: tuple[str, ...] = (
    "plugins.identity",
    "plugins.attention",
    "plugins.sorting",
    "plugins.gradient_study",
    "plugins.identity_figures",
    "plugins.attention_figures",
    "plugins.sorting_figures",
    "plugins.diagnostics_figures",
    "estimators.plugins.sparse",
    "estimators.plugins.reinforce",
    "estimators.plugins.gumbel_sinkhorn",
    "estimators.plugins.dense",
    "estimators.plugins.bilinear",
    "estimators.plugins.rloo",
    "estimators.plugins.perturbed",
    "estimators.plugins.imle",
    "estimators.plugins.softsort",
)
ENTRY_POINT_GROUP = "sparsebench"
ENV_VAR = "SPARSEBENCH_PLUGINS"  # comma-separated module paths (or no:NAME), added to --plugin
DISABLE_ENV_VAR = "SPARSEBENCH_DISABLE_PLUGINS"  # comma-separated plugin names never loaded
DISABLE_PREFIX = "no:"  # --plugin no:NAME switches a plugin off, as pytest's -p no:NAME

#: The hook names of the contract (``harness.hookspecs``).
HOOKS: tuple[str, ...] = tuple(
    name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(fn, "sparsebench_spec")
)
REQUIRED_TASK_PARAMS = ("steps", "eval_every", "lr", "batch_size")


@dataclass(frozen=True)
class Registered:
    """Something a plugin registered, with where it came from (for listings and error lines)."""

    obj: Any
    plugin: str
    source: str


@dataclass
class Registry:
    """What the loaded plugins offer; the only view of plugins the rest of the harness sees."""

    plugins: dict[str, str] = field(default_factory=dict)  # plugin name -> source
    tasks: dict[str, Registered] = field(default_factory=dict)
    estimators: dict[str, Registered] = field(default_factory=dict)
    figures: list[Registered] = field(default_factory=list)
    disabled: dict[str, str] = field(default_factory=dict)  # plugin name -> source, not loaded
    warnings: list[str] = field(default_factory=list)  # one line each, for stderr
    objects: dict[str, Any] = field(default_factory=dict)  # plugin name -> the loaded module
    dists: dict[str, metadata.Distribution | None] = field(default_factory=dict)
    _versions: dict[str, str] = field(default_factory=dict, repr=False)

    def task(self, name: str) -> Task:
        return self.tasks[name].obj

    def estimator(self, name: str) -> Estimator:
        return self.estimators[name].obj

    def provided_by(self, plugin: str) -> list[str]:
        """Names of everything ``plugin`` registered, for ``sparsebench plugins``."""
        found = [f"task:{n}" for n, r in self.tasks.items() if r.plugin == plugin]
        found += [f"estimator:{n}" for n, r in self.estimators.items() if r.plugin == plugin]
        found += [f"figure:{r.obj.name}" for r in self.figures if r.plugin == plugin]
        return found

    def version(self, plugin: str) -> str:
        """The code a plugin module runs (``harness.plugins.versions.code_version``), for listings."""
        if plugin not in self._versions:
            self._versions[plugin] = code_version(self.objects[plugin], self.dists.get(plugin))
        return self._versions[plugin]

    def _entry(self, role: str, name: str) -> Registered:
        return (self.tasks if role == "task" else self.estimators)[name]

    def code(self, role: str, name: str) -> str:
        """The code one task or estimator runs (``role``: ``"task"``, ``"estimator"``): its own
        module and what that imports, not its whole plugin package; part of every cell id."""
        key = f"{role}:{name}"
        if key not in self._versions:
            entry = self._entry(role, name)
            self._versions[key] = code_version(entry.obj, self.dists.get(entry.plugin))
        return self._versions[key]

    def source(self, role: str, name: str) -> str:
        """The source hash of one task's or estimator's code, for a release too (whose ``code`` is
        its version label alone); recorded with every cell, never part of its id."""
        key = f"{role}:{name}:src"
        if key not in self._versions:
            entry = self._entry(role, name)
            self._versions[key] = source_hash(entry.obj, self.dists.get(entry.plugin))
        return self._versions[key]


@dataclass(frozen=True)
class _Candidate:
    name: str
    source: str
    load: Callable[[], Any]
    dist: metadata.Distribution | None = None
    hint: str = ""  # how to switch it off (installed plugins: the user did not name them here)


def _import(module_path: str, source: str) -> ModuleType:
    try:
        return importlib.import_module(module_path)
    except Exception as e:  # any import-time failure is the plugin's fault, reported as such
        raise PluginError(
            f"plugin {module_path!r} ({source}) failed to import: {type(e).__name__}: {e}"
        ) from e


def _working_folder_on_path() -> None:
    """``--plugin my_module`` finds ``./my_module.py``, as ``python -m`` would; appended, so that an
    installed package of the same name still wins."""
    cwd = os.getcwd()
    if not any(os.path.abspath(p or ".") == cwd for p in sys.path):
        sys.path.append(cwd)


def _off_hint(name: str) -> str:
    return f"; switch it off with -p {DISABLE_PREFIX}{name} or {DISABLE_ENV_VAR}={name}"


def _discover(modules: Iterable[str]) -> list[_Candidate]:
    """Every plugin in load order: built-ins, entry points, then ``--plugin`` and the env var."""
    found = [_Candidate(m, "built-in", lambda m=m: _import(m, "built-in")) for m in DEFAULT_PLUGINS]
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist
        source = f"{dist.name} {dist.version}" if dist else "entry point"

        def load_ep(ep=ep, source=source) -> Any:
            try:
                return ep.load()
            except Exception as e:
                raise PluginError(
                    f"plugin {ep.name!r} ({source}, {ep.value}) failed to load: {type(e).__name__}: {e}"
                ) from e

        found.append(_Candidate(ep.name, source, load_ep, dist, _off_hint(ep.name)))
    for module_path in modules:
        source = f"module {module_path}"
        found.append(_Candidate(module_path, source, lambda m=module_path, s=source: _import(m, s)))
    return found


def _split(items: Iterable[str]) -> tuple[list[str], set[str]]:
    """``--plugin`` / env items -> (modules to load, names to switch off)."""
    modules, off = [], set()
    for item in items:
        item = item.strip()
        if item.startswith(DISABLE_PREFIX):
            off.add(item.removeprefix(DISABLE_PREFIX).strip())
        elif item:
            modules.append(item)
    return modules, off


NAME = re.compile(r"[a-z][a-z0-9_]*")  # a task or estimator name: config keys, run names, ids


def _check_name(what: str, name: Any, where: str) -> None:
    if not isinstance(name, str) or not name:
        raise PluginError(f"{where} registered {what} without a name")
    if not NAME.fullmatch(name):
        raise PluginError(
            f"{where} registered {what} named {name!r}; names must match [a-z][a-z0-9_]* "
            "(they are config keys and parts of run names)"
        )


def _a(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def _check_registered(obj: Any, cls: type, what: str, where: str) -> str:
    """What a task and an estimator share: the right class, a name by the rule, kinds by the rule."""
    if not isinstance(obj, cls):
        expected = _a(f"{cls.__module__}.{cls.__name__}")
        raise PluginError(f"{where} registered {obj!r}, which is not {expected}")
    name = getattr(obj, "name", None)
    _check_name(_a(what), name, where)
    problem = kinds_problem(obj.kinds)
    if problem:
        raise PluginError(f"{where}: {what} {name!r} {problem}")
    return name


def _check_task(task: Any, plugin: str, source: str) -> None:
    where = f"plugin {plugin!r} ({source})"
    name = _check_registered(task, Task, "task", where)
    missing = [k for k in (*REQUIRED_TASK_PARAMS, task.size_key) if k not in task.defaults]
    if missing:
        raise PluginError(f"{where}: task {name!r} defaults lack {', '.join(missing)}")


def _check_estimator(est: Any, plugin: str, source: str) -> None:
    _check_registered(est, Estimator, "estimator", f"plugin {plugin!r} ({source})")


def load(extra: Iterable[str] = ()) -> Registry:
    """Load every plugin and collect what it registers; raise ``PluginError`` on the first fault.

    ``extra`` holds ``--plugin`` values: module paths, or ``no:NAME`` to switch a plugin off
    (matched against plugin names and, for installed plugins, distribution names).
    """
    env = os.environ.get(ENV_VAR, "").split(",")
    modules, off = _split([*extra, *env])
    off |= {n.strip() for n in os.environ.get(DISABLE_ENV_VAR, "").split(",") if n.strip()}
    if modules:
        _working_folder_on_path()
    pm = pluggy.PluginManager("sparsebench")
    pm.add_hookspecs(hookspecs)
    registry = Registry()
    matched: set[str] = set()
    hints: dict[str, str] = {}
    for cand in _discover(modules):
        names = {cand.name} | ({cand.dist.name} if cand.dist is not None else set())
        if names & off:
            matched |= names & off
            registry.disabled[cand.name] = cand.source
            continue
        if cand.name in registry.plugins:
            if registry.plugins[cand.name] == cand.source:
                continue  # the same module named twice (e.g. --plugin and the env var)
            raise PluginError(
                f"plugin {cand.name!r} ({cand.source}) clashes with {registry.plugins[cand.name]}"
            )
        hints[cand.name] = cand.hint
        try:
            _register(pm, registry, cand)
        except PluginError as e:
            raise PluginError(f"{e}{cand.hint}") from e.__cause__
    for name in sorted(off - matched):
        registry.warnings.append(f"no plugin named {name!r} to switch off (see `sparsebench plugins`)")
    try:  # after _check_hooks nothing can be pending; this is pluggy's own word on it
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        name = pm.get_name(e.plugin) or repr(e.plugin)
        source = registry.plugins.get(name, "unknown source")
        raise PluginError(f"plugin {name!r} ({source}) is invalid: {' '.join(str(e).split())}") from e
    _collect(pm, registry, hints)
    return registry


def _register(pm: pluggy.PluginManager, registry: Registry, cand: _Candidate) -> None:
    plugin = cand.load()
    if pm.is_registered(plugin):
        other = pm.get_name(plugin)
        registry.warnings.append(
            f"plugin {cand.name!r} ({cand.source}) is the module already loaded as plugin "
            f"{other!r} ({registry.plugins[other]}); loaded once"
        )
        return
    _check_hooks(pm, plugin, cand)
    try:
        pm.register(plugin, name=cand.name)
    except Exception as e:  # pluggy's validation: wrong hook arguments
        detail = " ".join(str(e).split())  # pluggy's message spans lines; ours is one
        raise PluginError(f"plugin {cand.name!r} ({cand.source}) is invalid: {detail}") from e
    registry.plugins[cand.name] = cand.source
    registry.objects[cand.name] = plugin
    registry.dists[cand.name] = cand.dist


def _check_hooks(pm: pluggy.PluginManager, plugin: Any, cand: _Candidate) -> None:
    """Unknown hook names and hook-like functions without ``@hookimpl`` are errors: pluggy would
    register the first without complaint and ignore the second, and the plugin would load, offer
    nothing, and leave the user with ``unknown estimator`` much later."""
    where = f"plugin {cand.name!r} ({cand.source})"
    for attr in dir(plugin):
        marked = pm.parse_hookimpl_opts(plugin, attr) is not None
        close = difflib.get_close_matches(attr, HOOKS, n=1, cutoff=0.8)
        if marked and attr not in HOOKS:
            guess = f"; did you mean {close[0]!r}?" if close else ""
            raise PluginError(
                f"{where} implements unknown hook {attr!r}{guess} (hooks: {', '.join(HOOKS)})"
            )
        if not marked and close and inspect.isfunction(getattr(plugin, attr, None)):
            raise PluginError(
                f"{where} defines {attr}() without @hookimpl, so it would never be called; "
                "decorate it with `from estimators.base import hookimpl`"
                + ("" if attr in HOOKS else f" (and did you mean {close[0]!r}?)")
            )


def _collect(pm: pluggy.PluginManager, registry: Registry, hints: dict[str, str]) -> None:
    """Call each hook implementation with a ``register`` that knows which plugin is calling."""
    for hook_name, table, check in (
        ("register_tasks", registry.tasks, _check_task),
        ("register_estimators", registry.estimators, _check_estimator),
    ):
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            plugin, source = impl.plugin_name, registry.plugins[impl.plugin_name]

            def register(obj: Any, plugin=plugin, source=source, table=table, check=check) -> None:
                check(obj, plugin, source)
                if obj.name in table:
                    other = table[obj.name]
                    raise PluginError(
                        f"plugin {plugin!r} ({source}) registers {obj.name!r}, already registered "
                        f"by plugin {other.plugin!r} ({other.source})"
                    )
                table[obj.name] = Registered(obj, plugin, source)

            _call(impl, register, source, hints[plugin])
    for impl in pm.hook.register_figures.get_hookimpls():
        source = registry.plugins[impl.plugin_name]

        def add_figure(fig: Any, plugin=impl.plugin_name, source=source) -> None:
            registry.figures.append(Registered(fig, plugin, source))

        _call(impl, add_figure, source, hints[impl.plugin_name])


def _call(impl: pluggy.HookImpl, register: Callable[[Any], None], source: str, hint: str) -> None:
    try:
        impl.function(register=register)
    except PluginError as e:
        raise PluginError(f"{e}{hint}") from e.__cause__
    except Exception as e:
        raise PluginError(
            f"plugin {impl.plugin_name!r} ({source}) failed in {impl.function.__name__}: "
            f"{type(e).__name__}: {e}{hint}"
        ) from e
