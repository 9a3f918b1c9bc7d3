"""The plugin manager: built-ins, the ``sparsebench`` entry-point group, ``--plugin`` and
``SPARSEBENCH_PLUGINS``, all loaded through the same hooks and validated in one place."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any

import pluggy

from estimators.base import KINDS, Estimator
from harness import hookspecs
from harness.errors import PluginError
from harness.task import Task

__all__ = ["DEFAULT_PLUGINS", "ENTRY_POINT_GROUP", "ENV_VAR", "Registered", "Registry", "load"]

#: Built-in plugins, loaded through the very hooks third-party plugins use.
DEFAULT_PLUGINS: tuple[str, ...] = (
    "plugins.identity",
    "plugins.attention",
    "plugins.sorting",
    "plugins.identity_figures",
    "plugins.attention_figures",
    "plugins.sorting_figures",
    "estimators.plugins.sparse",
    "estimators.plugins.reinforce",
    "estimators.plugins.gumbel_sinkhorn",
    "estimators.plugins.dense",
    "estimators.plugins.bilinear",
)
ENTRY_POINT_GROUP = "sparsebench"
ENV_VAR = "SPARSEBENCH_PLUGINS"  # comma-separated module paths, added to --plugin

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


def _import(module_path: str, source: str) -> ModuleType:
    try:
        return importlib.import_module(module_path)
    except Exception as e:  # any import-time failure is the plugin's fault, reported as such
        raise PluginError(
            f"plugin {module_path!r} ({source}) failed to import: {type(e).__name__}: {e}"
        ) from e


def _discover(extra: Iterable[str]) -> list[tuple[str, str, Callable[[], Any]]]:
    """(plugin name, source, loader) for every plugin, in load order."""
    found: list[tuple[str, str, Callable[[], Any]]] = [
        (m, "built-in", lambda m=m: _import(m, "built-in")) for m in DEFAULT_PLUGINS
    ]
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

        found.append((ep.name, source, load_ep))
    env = [m.strip() for m in os.environ.get(ENV_VAR, "").split(",") if m.strip()]
    for module_path in [*extra, *env]:
        source = f"module {module_path}"
        found.append((module_path, source, lambda m=module_path, s=source: _import(m, s)))
    return found


def _check_task(task: Any, plugin: str, source: str) -> None:
    where = f"plugin {plugin!r} ({source})"
    if not isinstance(task, Task):
        raise PluginError(f"{where} registered {task!r}, which is not a harness.task.Task")
    name = getattr(task, "name", None)
    if not isinstance(name, str) or not name:
        raise PluginError(f"{where} registered a task without a name")
    if not task.kinds or set(task.kinds) - set(KINDS):
        raise PluginError(f"{where}: task {name!r} kinds {task.kinds!r} must be among {KINDS}")
    missing = [k for k in (*REQUIRED_TASK_PARAMS, task.size_key) if k not in task.defaults]
    if missing:
        raise PluginError(f"{where}: task {name!r} defaults lack {', '.join(missing)}")


def _check_estimator(est: Any, plugin: str, source: str) -> None:
    where = f"plugin {plugin!r} ({source})"
    if not isinstance(est, Estimator):
        raise PluginError(f"{where} registered {est!r}, which is not an estimators.base.Estimator")
    name = getattr(est, "name", None)
    if not isinstance(name, str) or not name:
        raise PluginError(f"{where} registered an estimator without a name")
    if not est.kinds or set(est.kinds) - set(KINDS):
        raise PluginError(f"{where}: estimator {name!r} kinds {set(est.kinds)} not among {KINDS}")


def load(extra: Iterable[str] = ()) -> Registry:
    """Load every plugin and collect what it registers; raise ``PluginError`` on the first fault."""
    pm = pluggy.PluginManager("sparsebench")
    pm.add_hookspecs(hookspecs)
    registry = Registry()
    for name, source, loader in _discover(extra):
        if name in registry.plugins:
            if registry.plugins[name] == source:
                continue  # the same module named twice (e.g. --plugin and the env var)
            raise PluginError(f"plugin {name!r} ({source}) clashes with {registry.plugins[name]}")
        plugin = loader()
        try:
            pm.register(plugin, name=name)
        except Exception as e:  # pluggy's validation: misspelt hook, wrong arguments
            detail = " ".join(str(e).split())  # pluggy's message spans lines; ours is one
            raise PluginError(f"plugin {name!r} ({source}) is invalid: {detail}") from e
        registry.plugins[name] = source
    _collect(pm, registry)
    return registry


def _collect(pm: pluggy.PluginManager, registry: Registry) -> None:
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

            _call(impl, register, source)
    for impl in pm.hook.register_figures.get_hookimpls():
        source = registry.plugins[impl.plugin_name]

        def add_figure(fig: Any, plugin=impl.plugin_name, source=source) -> None:
            registry.figures.append(Registered(fig, plugin, source))

        _call(impl, add_figure, source)


def _call(impl: pluggy.HookImpl, register: Callable[[Any], None], source: str) -> None:
    try:
        impl.function(register=register)
    except PluginError:
        raise
    except Exception as e:
        raise PluginError(
            f"plugin {impl.plugin_name!r} ({source}) failed in {impl.function.__name__}: "
            f"{type(e).__name__}: {e}"
        ) from e
