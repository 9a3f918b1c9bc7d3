"""The hooks a sparsebench plugin may implement (the objects they register are documented in
``estimators.base``, ``harness.task`` and ``reports.figure``; docs/plugins.md states the whole
contract).

Every hook takes a ``register`` callback rather than returning values (as in ``llm``): the host
validates each object as it arrives and records which plugin registered it, so a clash or a broken
object is reported with the plugin's name and source. All hooks are called once, at start-up,
on every plugin (none is ``firstresult``); the built-in plugins use the same hooks. Implementations
carry ``hookimpl``; a marked function with another name, or a hook-named function without the
mark, is an error when the plugin loads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from estimators.base import Estimator
    from harness.task import Task
    from reports.figure import Figure

__all__ = ["hookimpl", "hookspec"]

hookspec = pluggy.HookspecMarker("sparsebench")
hookimpl = pluggy.HookimplMarker("sparsebench")


@hookspec
def register_tasks(register: Callable[[Task], None]) -> None:
    """Register ``Task`` instances. Called by the host at start-up; task names must be unique."""


@hookspec
def register_estimators(register: Callable[[Estimator], None]) -> None:
    """Register ``Estimator`` instances. Called by the host at start-up; names must be unique."""


@hookspec
def register_figures(register: Callable[[Figure], None]) -> None:
    """Register report ``Figure`` builders (usually one per paper figure of a task).

    Called by ``sparsebench report``; each figure is drawn from the store's tidy frame, so a task
    plugin contributes its own figures without the report knowing the task.
    """
