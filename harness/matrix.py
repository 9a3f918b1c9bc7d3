"""Resolve a raw config into the comparison matrix: task x variant x estimator x (sweep) x seed.

Every key and value is checked here against what the registered plugins declare, before anything
touches the tracking store, so a typo costs one line and exit code 2, never a half-written run.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from estimators.base import Estimator, Spec
from harness.errors import ConfigError, UsageError
from harness.plugins import REQUIRED_TASK_PARAMS as RUNNER_PARAMS
from harness.plugins import Registry
from harness.task import Task

__all__ = ["ALL", "Cell", "Selection", "choose_kind", "resolve_cells"]

MATRIX_KEYS = ("tasks", "estimators", "seeds")
OVERRIDE_KEYS = ("match", "task", "estimator", "sweep")
POSITIVE = ("batch_size", "lr")
NON_NEGATIVE = ("steps", "eval_every")  # 0: the task derives it (e.g. from epochs)
ALL = "*"  # in a list of task or estimator names: every registered one, in load order


@dataclass(frozen=True)
class Selection:
    """Command-line narrowing of the matrix; empty means 'as configured'."""

    tasks: tuple[str, ...] = ()
    estimators: tuple[str, ...] = ()
    sizes: tuple[int, ...] = ()
    seeds: tuple[int, ...] = ()


@dataclass(frozen=True)
class Cell:
    """One fully resolved point of the matrix; plain data, so any backend can run it."""

    task: str
    variant: str
    estimator: str
    seed: int
    task_params: dict[str, Any]
    estimator_params: dict[str, Any]
    sweep: str = ""
    code: dict[str, str] = field(default_factory=dict)  # "task"/"estimator" -> plugin code version
    kind: str | None = None
    na_reason: str | None = None
    spec: Spec | None = field(default=None, compare=False)

    @property
    def name(self) -> str:
        parts = [self.task, self.variant, self.estimator, self.sweep, f"seed={self.seed}"]
        return "/".join(p for p in parts if p)

    def resolved(self) -> dict[str, Any]:
        """The whole config the result depends on (plus names and the code of the two plugins
        that build the cell); what ``cell_id`` hashes, so changed plugin code means a new cell."""
        return {
            "task": self.task,
            "estimator": self.estimator,
            "seed": self.seed,
            "task_params": self.task_params,
            "estimator_params": self.estimator_params,
            "code": self.code,
        }

    @property
    def cell_id(self) -> str:
        blob = json.dumps(self.resolved(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _typed(where: str, key: str, value: Any, default: Any) -> Any:
    """Check ``value`` against the type of ``default``; ints are accepted for floats."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, (list, tuple)):
        ok = isinstance(value, (list, tuple))
        value = list(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(
            f"{where}: {key} = {value!r} should be {type(default).__name__} like its default {default!r}"
        )
    return value


def _update(where: str, params: dict[str, Any], extra: Mapping[str, Any], owner: Task | Estimator) -> None:
    """Apply ``extra`` to ``params``, checking keys, types and choices against the plugin."""
    defaults, choices = owner.defaults, owner.choices
    for key, value in extra.items():
        if key not in defaults:
            raise ConfigError(f"{where}: unknown key {key!r}; known: {', '.join(sorted(defaults))}")
        params[key] = _typed(where, key, value, defaults[key])
        if key in choices and value not in choices[key]:
            allowed = ", ".join(map(repr, choices[key]))
            raise ConfigError(f"{where}: {key} = {value!r} is not one of {allowed}")


def _names(where: str, value: Any, known: Iterable[str], what: str) -> list[str]:
    """The names ``value`` lists, each once; ``"*"`` stands for every known name in load order."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where} must be a list of {what} names (or \"{ALL}\" for all)")
    known = list(known)
    names: list[str] = []
    for name in value:
        if name not in known and name != ALL:
            raise ConfigError(f"unknown {what} {name!r}; known: {', '.join(sorted(known))}")
        names += [n for n in (known if name == ALL else [name]) if n not in names]
    return names


def _variant_label(variant: Mapping[str, Any], params: Mapping[str, Any], size_key: str) -> str:
    """``n=16``; the size always shows, then what else the variant sets, bar training lengths."""
    keys = [size_key, *(k for k in variant if k not in (size_key, *RUNNER_PARAMS))]
    return ",".join(f"{k}={params[k]}" for k in keys)


def _matches(match: Mapping[str, Any], task: str, estimator: str, params: Mapping[str, Any]) -> bool:
    for key, want in match.items():
        have = {"task": task, "estimator": estimator}.get(key, params.get(key))
        if have != want:
            return False
    return True


def _check_values(where: str, params: Mapping[str, Any], size_key: str) -> None:
    for key in (*POSITIVE, size_key):
        value = params.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
            raise ConfigError(f"{where}: {key} = {value!r} must be positive")
    for key in NON_NEGATIVE:
        if params[key] < 0:
            raise ConfigError(f"{where}: {key} = {params[key]!r} must not be negative")


def resolve_cells(
    config: Mapping[str, Any], registry: Registry, selection: Selection = Selection()
) -> list[Cell]:
    """Every cell of the selected matrix, in a stable order, with n/a cells marked and explained."""
    matrix = dict(config.get("matrix", {}))
    for key in matrix:
        if key not in MATRIX_KEYS:
            raise ConfigError(f"[matrix]: unknown key {key!r}; known: {', '.join(MATRIX_KEYS)}")
    task_names = _names("[matrix] tasks", matrix.get("tasks", sorted(registry.tasks)), registry.tasks, "task")
    est_names = _names(
        "[matrix] estimators",
        matrix.get("estimators", sorted(registry.estimators)),
        registry.estimators,
        "estimator",
    )
    seeds = list(selection.seeds) or matrix.get("seeds", [0])
    if not isinstance(seeds, list) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds
    ):
        raise ConfigError(f"[matrix] seeds = {seeds!r} must be a list of non-negative integers")
    if selection.tasks:
        task_names = _names("--task", list(selection.tasks), registry.tasks, "task")
    if selection.estimators:
        est_names = _names("--estimator", list(selection.estimators), registry.estimators, "estimator")
    for size in selection.sizes:
        if size <= 0:
            raise ConfigError(f"--size {size}: sizes must be positive")

    # Every section is resolved, selected or not: a typo should not wait for the day it is selected.
    task_sections, est_sections = config.get("tasks", {}), config.get("estimators", {})
    for name in task_sections:
        _names("[tasks]", name, registry.tasks, "task")
    for name in est_sections:
        _names("[estimators]", name, registry.estimators, "estimator")
    variants_of = {
        name: _task_variants(name, task_sections.get(name, {}), registry.task(name))
        for name in dict.fromkeys([*task_sections, *task_names])
    }
    est_base = {
        name: _resolved(f"[estimators.{name}]", est_sections.get(name, {}), registry.estimator(name))
        for name in dict.fromkeys([*est_sections, *est_names])
    }
    overrides = config.get("overrides", [])
    for i, ov in enumerate(overrides):
        bad = sorted(set(ov) - set(OVERRIDE_KEYS))
        if bad:
            raise ConfigError(
                f"[[overrides]] #{i + 1}: unknown key {bad[0]!r}; known: {', '.join(OVERRIDE_KEYS)}"
            )

    cells: list[Cell] = []
    for task_name in task_names:
        size_key = registry.task(task_name).size_key
        for variant, vparams in variants_of[task_name]:
            if selection.sizes and vparams[size_key] not in selection.sizes:
                continue
            label = _variant_label(variant, vparams, size_key)
            for est_name in est_names:
                cells += _expand(
                    task_name, label, vparams, est_name, est_base[est_name], seeds, registry, overrides
                )
    if not cells:
        raise ConfigError("the selection matches no cell: check --task, --estimator and --size")
    return cells


def _resolved(where: str, extra: Mapping[str, Any], owner: Task | Estimator) -> dict[str, Any]:
    """The plugin's defaults with ``extra`` applied and checked."""
    params = dict(owner.defaults)
    _update(where, params, extra, owner)
    return params


def _task_variants(
    name: str, section: Mapping[str, Any], task: Task
) -> list[tuple[Mapping[str, Any], dict[str, Any]]]:
    """(variant table, resolved task params) for each variant of a ``[tasks.<name>]`` section."""
    base = _resolved(f"[tasks.{name}]", {k: v for k, v in section.items() if k != "variants"}, task)
    out = []
    for variant in section.get("variants", [{}]):
        params = dict(base)
        _update(f"[tasks.{name}] variant {variant!r}", params, variant, task)
        out.append((variant, params))
    return out


def _expand(
    task_name: str,
    label: str,
    vparams: dict[str, Any],
    est_name: str,
    est_params: dict[str, Any],
    seeds: list[int],
    registry: Registry,
    overrides: list[Mapping[str, Any]],
) -> list[Cell]:
    task, est = registry.task(task_name), registry.estimator(est_name)
    where = f"{task_name}/{label}/{est_name}"
    tparams = dict(vparams)
    eparams = dict(est_params)
    sweep: dict[str, list[Any]] = {}
    for ov in overrides:
        if _matches(ov.get("match", {}), task_name, est_name, vparams):
            _update(f"[[overrides]] for {where} task", tparams, ov.get("task", {}), task)
            _update(f"[[overrides]] for {where} estimator", eparams, ov.get("estimator", {}), est)
            sweep.update(ov.get("sweep", {}))
    points: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
    keys = list(sweep)
    for combo in itertools.product(*(sweep[k] for k in keys)) if keys else [()]:
        tp, ep = dict(tparams), dict(eparams)
        for key, value in zip(keys, combo, strict=True):
            scope, _, name = key.partition(".")
            if scope == "task":
                _update(f"[[overrides]] sweep for {where}", tp, {name: value}, task)
            elif scope == "estimator":
                _update(f"[[overrides]] sweep for {where}", ep, {name: value}, est)
            else:
                raise ConfigError(f"[[overrides]] sweep key {key!r} must start with 'task.' or 'estimator.'")
        label_sweep = ",".join(f"{k.partition('.')[2]}={v}" for k, v in zip(keys, combo, strict=True))
        _check_values(where, tp, task.size_key)
        try:
            task.check(tp)
        except UsageError as e:
            raise ConfigError(f"{where}: {e}") from None
        points.append((label_sweep, tp, ep))

    code = {
        "task": registry.version(registry.tasks[task_name].plugin),
        "estimator": registry.version(registry.estimators[est_name].plugin),
    }
    cells = []
    for sw, tp, ep in points:
        kind, spec, reason = choose_kind(task, est, tp, ep)
        cells += [
            Cell(
                task_name, label, est_name, seed, tp, ep,
                sweep=sw, code=code, kind=kind, na_reason=reason, spec=spec,
            )  # fmt: skip
            for seed in seeds
        ]
    return cells


def choose_kind(
    task: Any, est: Any, params: Mapping[str, Any], est_params: Mapping[str, Any]
) -> tuple[str | None, Spec | None, str | None]:
    """The first of the task's kinds that the estimator can serve, else the reason it cannot."""
    if not set(task.kinds) & set(est.kinds):
        return (
            None,
            None,
            f"{est.name} builds {', '.join(sorted(est.kinds))}; {task.name} needs {' or '.join(task.kinds)}",
        )
    reasons = []
    for kind in task.kinds:
        spec = task.spec(kind, params)
        reason = est.unsupported(spec, est_params)
        if reason is None:
            return kind, spec, None
        reasons.append(reason)
    return None, None, "; ".join(dict.fromkeys(reasons))
