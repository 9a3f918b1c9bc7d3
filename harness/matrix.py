"""Resolve a raw config into the comparison matrix: task x variant x estimator x (sweep) x seed.

Every key and value is checked here against what the registered plugins declare, before anything
touches the tracking store, so a typo costs one line and exit code 2, never a half-written run:
types against the defaults, choices, finite floats, the signs a plugin declares (``positive``,
``non_negative``), then each plugin's own ``check``. Values given with ``--set`` (``forced``) win
over variants and ``[[overrides]]``: they are applied last.

With a ``[tuning]`` table (``harness.tuning``), each cell becomes ``trials`` cells, one per point
drawn from the search space of its task and estimator (``space``); a parameter that an
``[[overrides]]`` entry, an ``[estimators.NAME]`` table or ``--set`` gives the cell is pinned there
and not searched, and must lie in its space (a ``[tasks.NAME]`` value is the untuned start, the
same for every estimator, and is searched). The trial's values label the cell's ``sweep``, so a
trial is a cell like any.

A task table or a variant may also hold ``resources`` (what one cell asks of a Ray node): kept
on the ``Cell`` apart from its parameters, so it never changes a cell's id. So is the
``[diagnostics]`` table (``harness.run.diagnostics``): it adds measurements, not a different result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from estimators.base import Estimator, Spec
from estimators.params import ParamError, check_numbers, in_space, space_dimension, space_problems
from harness.capacity import check_fits, machine_memory
from harness.errors import ConfigError, UsageError
from harness.plugins import REQUIRED_TASK_PARAMS as RUNNER_PARAMS
from harness.plugins import Registry
from harness.run.diagnostics import Diagnose, diagnose_config
from harness.task import Task
from harness.tuning import Axis, Ruleset, draw, read_ruleset

__all__ = ["ALL", "Cell", "Selection", "check_data", "choose_kind", "resolve_cells"]

MATRIX_KEYS = ("tasks", "estimators", "seeds")
OVERRIDE_KEYS = ("match", "task", "estimator", "sweep")
RESOURCE_KEYS = ("num_cpus", "num_gpus")
# What the runner itself reads, whatever a task declares.
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
    code: dict[str, str] = field(default_factory=dict)  # "task"/"estimator" -> its code version
    # "task"/"estimator" -> the source hash of its code, release or not: recorded, not in the id
    sources: dict[str, str] = field(default_factory=dict, compare=False)
    kind: str | None = None
    na_reason: str | None = None
    spec: Spec | None = field(default=None, compare=False)
    # what the cell asks of a Ray node; where it runs, not what it computes: not in ``resolved()``
    resources: dict[str, float] = field(default_factory=dict, compare=False)
    # gradient measurements during training; they leave its training bit-identical: not in ``resolved()``
    diagnose: Diagnose = field(default_factory=Diagnose, compare=False)
    # a tuning trial: its index among its estimator's trials, the values it tries (also in the
    # params, so in the id) and the ruleset as JSON (``Ruleset.record``); None/empty otherwise
    trial: int | None = None
    trial_values: dict[str, Any] = field(default_factory=dict)
    tuning: str = ""

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


def _of_type(value: Any, default: Any) -> tuple[bool, Any]:
    """Whether ``value`` has the type of ``default`` (ints pass for floats), and the value to keep."""
    if isinstance(default, bool):
        return isinstance(value, bool), value
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool), value
    if isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    return isinstance(value, type(default)), value


def _typed(where: str, key: str, value: Any, default: Any) -> Any:
    """Check ``value`` against the type of ``default``; a list's items against the default's first
    item (an empty default leaves its items to the plugin's ``check``)."""
    if isinstance(default, (list, tuple)):
        ok = isinstance(value, (list, tuple))
        if ok and default:
            items = [_of_type(v, default[0]) for v in value]
            ok = all(good for good, _ in items)
            value = [v for _, v in items]
        value = list(value) if ok else value
    else:
        ok, value = _of_type(value, default)
    if not ok:
        raise ConfigError(
            f"{where}: {key} = {value!r} should be {type(default).__name__} like its default {default!r}"
        )
    return value


def _update(where: str, params: dict[str, Any], extra: Any, owner: Task | Estimator) -> None:
    """Apply ``extra`` to ``params``, checking keys, types and choices against the plugin."""
    defaults, choices = owner.defaults, owner.choices
    _table(where, extra)
    for key, value in extra.items():
        if key not in defaults:
            raise ConfigError(f"{where}: unknown key {key!r}; known: {', '.join(sorted(defaults))}")
        params[key] = _typed(where, key, value, defaults[key])
        if key in choices and value not in choices[key]:
            allowed = ", ".join(map(repr, choices[key]))
            raise ConfigError(f"{where}: {key} = {value!r} is not one of {allowed}")


def _table(where: str, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a table, not {value!r}")
    return value


def _list_of_tables(where: str, value: Any) -> list[Mapping[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
        raise ConfigError(f"{where} must be a list of tables, not {value!r}")
    return value


def _names(where: str, value: Any, known: Iterable[str], what: str) -> list[str]:
    """The names ``value`` lists, each once; ``"*"`` stands for every known name in load order."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where} must be a list of {what} names (or \"{ALL}\" for all)")
    if not value:
        raise ConfigError(f"{where} is empty; name at least one {what}")
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


def _resources(where: str, base: Mapping[str, float], extra: Any) -> dict[str, float]:
    """``base`` updated with a ``resources`` table, checked: a positive ``num_cpus``, and a
    ``num_gpus`` that is a fraction of one GPU or a whole number of them (as Ray takes it)."""
    merged = dict(base)
    for key, value in _table(f"{where} resources", extra).items():
        if key not in RESOURCE_KEYS:
            raise ConfigError(f"{where} resources: unknown key {key!r}; known: {', '.join(RESOURCE_KEYS)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{where} resources: {key} = {value!r} must be a finite number")
        if key == "num_cpus" and value <= 0:
            raise ConfigError(f"{where} resources: num_cpus = {value!r} must be positive")
        if key == "num_gpus" and (value < 0 or (value > 1 and value != int(value))):
            raise ConfigError(
                f"{where} resources: num_gpus = {value!r} must be a fraction of one GPU (0 to 1) "
                "or a whole number of GPUs"
            )
        merged[key] = float(value)
    return merged


def _check_numbers(where: str, params: Mapping[str, Any], owner: Task | Estimator) -> None:
    """The generic sanity layer (``estimators.params.check_numbers``), with the runner's own
    parameters' signs for a task."""
    runner = isinstance(owner, Task)
    positive, non_negative = ({*POSITIVE, owner.size_key}, NON_NEGATIVE) if runner else ((), ())
    try:
        check_numbers(owner, params, positive, non_negative)
    except ParamError as e:
        raise ConfigError(f"{where}: {e}") from None


def _check_plugin(where: str, params: Mapping[str, Any], owner: Task | Estimator) -> None:
    """The plugin's own ``check``: a ``ParamError`` (or the older ``ValueError`` / ``UsageError``)."""
    try:
        owner.check(params)
    except (ValueError, UsageError) as e:
        raise ConfigError(f"{where}: {e}") from None


def _check_cell(where: str, task: Task, tp: Mapping[str, Any], est: Estimator, ep: Mapping[str, Any]) -> None:
    """Every value a cell will run with, before anything runs: numbers, then the plugins' checks."""
    _check_numbers(f"{where} task", tp, task)
    _check_numbers(f"{where} estimator {est.name!r}", ep, est)
    _check_plugin(where, tp, task)
    _check_plugin(f"{where}: estimator {est.name!r}", ep, est)


def resolve_cells(
    config: Mapping[str, Any],
    registry: Registry,
    selection: Selection = Selection(),
    forced: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None,
) -> list[Cell]:
    """Every cell of the selected matrix, in a stable order, with n/a cells marked and explained.

    ``forced`` (``harness.config.set_layer``): task and estimator parameters that win over every
    variant and override. Cells that come out identical (a forced size over several variants)
    are listed once. With ``[tuning]``, every runnable cell is its ``trials`` trials.
    """
    ruleset = read_ruleset(config)
    matrix = dict(_table("[matrix]", config.get("matrix", {})))
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
    diagnose = diagnose_config(config.get("diagnostics"))
    seeds = list(selection.seeds) or matrix.get("seeds", [0])
    if not isinstance(seeds, list) or not all(
        isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**32 for s in seeds
    ):  # numpy's generator takes 32-bit seeds
        raise ConfigError(f"[matrix] seeds = {seeds!r} must be a list of integers in [0, 2**32)")
    if not seeds:
        raise ConfigError("[matrix] seeds is empty; give at least one seed")
    if selection.tasks:
        task_names = _names("--task", list(selection.tasks), registry.tasks, "task")
    if selection.estimators:
        est_names = _names("--estimator", list(selection.estimators), registry.estimators, "estimator")
    for size in selection.sizes:
        if size <= 0:
            raise ConfigError(f"--size {size}: sizes must be positive")

    # Every section is resolved, selected or not: a typo should not wait for the day it is selected.
    task_sections = _table("[tasks]", config.get("tasks", {}))
    est_sections = _table("[estimators]", config.get("estimators", {}))
    forced = forced or {}
    forced_tasks = _table("--set tasks", forced.get("tasks", {}))
    forced_ests = _table("--set estimators", forced.get("estimators", {}))
    for name in [*task_sections, *forced_tasks]:
        _names("[tasks]", name, registry.tasks, "task")
    for name in [*est_sections, *forced_ests]:
        _names("[estimators]", name, registry.estimators, "estimator")
    variants_of = {
        name: _task_variants(
            name,
            _table(f"[tasks.{name}]", task_sections.get(name, {})),
            forced_tasks.get(name, {}),
            registry.task(name),
        )
        for name in dict.fromkeys([*task_sections, *task_names])
    }
    est_base = {}
    for name in dict.fromkeys([*est_sections, *est_names]):
        est = registry.estimator(name)
        where = f"[estimators.{name}]"
        est_base[name] = _resolved(where, _table(where, est_sections.get(name, {})), est)
        _update(f"--set estimators.{name}", est_base[name], forced_ests.get(name, {}), est)
        _check_numbers(where, est_base[name], est)
        _check_plugin(where, est_base[name], est)
    overrides = _list_of_tables("[[overrides]]", config.get("overrides", []))
    for i, ov in enumerate(overrides):
        bad = sorted(set(ov) - set(OVERRIDE_KEYS))
        if bad:
            raise ConfigError(
                f"[[overrides]] #{i + 1}: unknown key {bad[0]!r}; known: {', '.join(OVERRIDE_KEYS)}"
            )
        for key in ("match", "task", "estimator", "sweep"):
            _table(f"[[overrides]] #{i + 1} {key}", ov.get(key, {}))
        for key, values in ov.get("sweep", {}).items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"[[overrides]] #{i + 1} sweep {key!r} must be a non-empty list of values")
        _check_match(f"[[overrides]] #{i + 1} match", ov.get("match", {}), registry)
        if ruleset is not None and ov.get("sweep"):
            raise ConfigError(
                f"[[overrides]] #{i + 1} sweep: [tuning] already searches each cell's space; "
                "drop the sweep, or the [tuning] table to sweep by hand"
            )
    for owner in [*(registry.task(n) for n in task_names), *(registry.estimator(n) for n in est_names)]:
        problems = space_problems(owner)
        if problems:
            what = "task" if isinstance(owner, Task) else "estimator"
            raise ConfigError(f"{what} {owner.name!r}: {problems[0]}")
    _check_sizes(selection.sizes, task_names, variants_of, registry)
    cells: dict[str, Cell] = {}  # by id: identical cells are listed once
    for task_name in task_names:
        size_key = registry.task(task_name).size_key
        for variant, vparams, resources in variants_of[task_name]:
            if selection.sizes and vparams[size_key] not in selection.sizes:
                continue
            label = _variant_label(variant, vparams, size_key)
            forced_task = {k: v for k, v in forced_tasks.get(task_name, {}).items() if k != "resources"}
            for est_name in est_names:
                for cell in _expand(
                    task_name, label, vparams, est_name, est_base[est_name], seeds, registry, overrides,
                    forced_task, forced_ests.get(est_name, {}), ruleset, set(est_sections.get(est_name, {})),
                ):
                    cells.setdefault(
                        cell.cell_id, dataclasses.replace(cell, resources=resources, diagnose=diagnose)
                    )
    if not cells:
        raise ConfigError("the selection matches no cell: check --task, --estimator and --size")
    return list(cells.values())


def _check_match(where: str, match: Mapping[str, Any], registry: Registry) -> None:
    """A match key must be ``task``, ``estimator`` or a task parameter: any other key would
    match no cell, and the override would be dropped without a word."""
    known = {"task", "estimator"} | {k for r in registry.tasks.values() for k in r.obj.defaults}
    for key in match:
        if key not in known:
            raise ConfigError(
                f"{where}: {key!r} is not a task parameter of any task, so it would match no cell; "
                "match on task, estimator or a task parameter (n, lr, ...)"
            )


def _check_sizes(
    sizes: Iterable[int], task_names: list[str], variants_of: Mapping[str, Any], registry: Registry
) -> None:
    """``--size`` values that no selected task's variant has: named, with the sizes there are."""
    have = {params[registry.task(name).size_key] for name in task_names for _, params, _ in variants_of[name]}
    missing = [s for s in sizes if s not in have]
    if missing:
        raise ConfigError(
            f"--size {','.join(map(str, missing))}: no variant of {', '.join(task_names)} has that size; "
            f"the sizes configured are {', '.join(map(str, sorted(have)))} "
            "(add one with --set 'tasks.NAME.variants=[...]')"
        )


def _resolved(where: str, extra: Mapping[str, Any], owner: Task | Estimator) -> dict[str, Any]:
    """The plugin's defaults with ``extra`` applied and checked."""
    params = dict(owner.defaults)
    _update(where, params, extra, owner)
    return params


def _task_variants(
    name: str, section: Mapping[str, Any], forced: Mapping[str, Any], task: Task
) -> list[tuple[Mapping[str, Any], dict[str, Any], dict[str, float]]]:
    """(variant table, resolved task params, resources) for each variant of a ``[tasks.<name>]``
    section. ``resources`` is taken out of the section and each variant before the parameters
    are checked; a ``--set`` of it has already been merged into ``section``, and wins."""
    where = f"[tasks.{name}]"
    base = _resolved(where, {k: v for k, v in section.items() if k not in ("variants", "resources")}, task)
    base_resources = _resources(where, task.resources, section.get("resources", {}))
    forced_resources = forced.get("resources", {})
    forced = {k: v for k, v in forced.items() if k != "resources"}
    variants = _list_of_tables(f"[tasks.{name}] variants", section.get("variants", [{}]))
    if not variants:
        raise ConfigError(f"[tasks.{name}] variants is empty; give at least one ([{{}}]: the defaults)")
    out = []
    for variant in variants:
        params = dict(base)
        where = f"[tasks.{name}] variant {variant!r}"
        resources = _resources(where, base_resources, variant.get("resources", {}))
        resources = _resources(f"--set tasks.{name}", resources, forced_resources)
        variant = {k: v for k, v in variant.items() if k != "resources"}
        _update(where, params, variant, task)
        _update(f"--set tasks.{name}", params, forced, task)
        _check_numbers(where, params, task)
        out.append((variant, params, resources))
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
    forced_task: Mapping[str, Any],
    forced_est: Mapping[str, Any],
    ruleset: Ruleset | None = None,
    configured: Iterable[str] = (),
) -> list[Cell]:
    task, est = registry.task(task_name), registry.estimator(est_name)
    where = f"{task_name}/{label}/{est_name}"
    tparams = dict(vparams)
    eparams = dict(est_params)
    sweep: dict[str, list[Any]] = {}
    # what the config gives this estimator or cell itself: not searched by [tuning]
    pinned = {f"task.{k}" for k in forced_task} | {f"estimator.{k}" for k in (*forced_est, *configured)}
    for ov in overrides:
        if _matches(ov.get("match", {}), task_name, est_name, vparams):
            _update(f"[[overrides]] for {where} task", tparams, ov.get("task", {}), task)
            _update(f"[[overrides]] for {where} estimator", eparams, ov.get("estimator", {}), est)
            sweep.update(ov.get("sweep", {}))
            pinned |= {f"task.{k}" for k in ov.get("task", {})}
            pinned |= {f"estimator.{k}" for k in ov.get("estimator", {})}
    # --set wins: over the overrides just applied, and a sweep over a forced key collapses.
    _update(f"--set tasks.{task_name}", tparams, forced_task, task)
    _update(f"--set estimators.{est_name}", eparams, forced_est, est)
    forced_keys = {f"task.{k}" for k in forced_task} | {f"estimator.{k}" for k in forced_est}
    sweep = {k: v for k, v in sweep.items() if k not in forced_keys}
    points: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
    keys = list(sweep)
    for combo in itertools.product(*(sweep[k] for k in keys)) if keys else [()]:
        values = dict(zip(keys, combo, strict=True))
        tp, ep = _apply("[[overrides]] sweep", where, task, tparams, est, eparams, values)
        points.append((_values_label(values), tp, ep))

    code = {"task": registry.code("task", task_name), "estimator": registry.code("estimator", est_name)}
    sources = {
        "task": registry.source("task", task_name),
        "estimator": registry.source("estimator", est_name),
    }
    trials: list[tuple[int | None, dict[str, Any]]] = [(None, {})] * len(points)
    tuning = ""
    kind = choose_kind(task, est, tparams, eparams)[0] if ruleset is not None else None
    axes = _axes(where, task, tparams, est, eparams, kind, pinned) if kind is not None else []
    if ruleset is not None and axes:  # no sweep here: [tuning] and a sweep are one or the other
        ((_, tp, ep),) = points
        trials = list(enumerate(draw(where, axes, ruleset)))
        tuning = ruleset.record(task.select_metric)
        points = [
            (_trial_label(i, v), *_apply("[tuning] trial", where, task, tp, est, ep, v)) for i, v in trials
        ]
    cells = []
    for (sw, tp, ep), (trial, values) in zip(points, trials, strict=True):
        kind, spec, reason = choose_kind(task, est, tp, ep)
        if spec is not None:
            check_fits(f"{where}{'/' + sw if sw else ''}", tp, task.size_key, spec, machine_memory())
        cells += [
            Cell(
                task_name, label, est_name, seed, tp, ep,
                sweep=sw, code=code, sources=sources, kind=kind, na_reason=reason, spec=spec,
                trial=trial, trial_values=values, tuning=tuning,
            )  # fmt: skip
            for seed in seeds
        ]
    return cells


def _axes(
    where: str,
    task: Task,
    tparams: Mapping[str, Any],
    est: Estimator,
    eparams: Mapping[str, Any],
    kind: str,
    pinned: set[str],
) -> list[Axis]:
    """The cell's searched parameters: the task's space, then the estimator's, less what the
    config pinned (which must lie in its space) and what the cell's kind does not read."""
    axes = []
    for scope, owner, params in (("task", task, tparams), ("estimator", est, eparams)):
        for name, declared in owner.space.items():
            dim, key = space_dimension(declared), f"{scope}.{name}"
            if dim.kinds and kind not in dim.kinds:
                continue
            if key in pinned:
                if not in_space(dim, params[name]):
                    value = params[name]
                    raise ConfigError(f"{where}: {name} = {value!r} is outside its search space ({dim})")
                continue
            axes.append(Axis(key, dim, owner.defaults[name]))
    return axes


def _values_label(values: Mapping[str, Any]) -> str:
    """``lr=0.00312,temperature=1.2``: a sweep point's or a trial's values, as a sweep label."""
    return ",".join(f"{k.partition('.')[2]}={v}" for k, v in values.items())


def _trial_label(index: int, values: Mapping[str, Any]) -> str:
    """``trial=3,lr=0.00312,temperature=1.2``: the trial's index and values, as a sweep label."""
    return ",".join(part for part in (f"trial={index}", _values_label(values)) if part)


def _apply(
    context: str, where: str, task: Task, tparams: Mapping[str, Any], est: Estimator,
    eparams: Mapping[str, Any], values: Mapping[str, Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The cell's params with ``task.``/``estimator.`` values put in (a sweep point or a tuning
    trial; ``context`` names which in errors), checked as any cell's are."""
    tp, ep = dict(tparams), dict(eparams)
    for key, value in values.items():
        scope, _, name = key.partition(".")
        if scope == "task":
            _update(f"{context} for {where}", tp, {name: value}, task)
        elif scope == "estimator":
            _update(f"{context} for {where}", ep, {name: value}, est)
        else:
            raise ConfigError(f"{context} key {key!r} must start with 'task.' or 'estimator.'")
    label = _values_label(values)
    _check_cell(f"{where}{'/' + label if label else ''}", task, tp, est, ep)
    return tp, ep


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


def check_data(cells: list[Cell], registry: Registry, allow_embedded: bool = False) -> list[Cell]:
    """Every runnable cell's data checked (``Task.check_data``) before anything is written.

    Returns the cells to run: the same, except where ``allow_embedded`` let a task substitute an
    embedded stand-in for missing data (its params, and so its id, say so). n/a cells never load
    data and are left alone. Each distinct (task, params) is checked once.
    """
    checked: dict[str, Mapping[str, Any]] = {}
    out = []
    for cell in cells:
        if cell.na_reason is not None:
            out.append(cell)
            continue
        key = json.dumps([cell.task, cell.task_params], sort_keys=True, default=str)
        if key not in checked:
            try:
                checked[key] = registry.task(cell.task).check_data(cell.task_params, allow_embedded)
            except UsageError as e:
                raise UsageError(f"{cell.task}: {e}") from None
        params = dict(checked[key])
        out.append(cell if params == cell.task_params else dataclasses.replace(cell, task_params=params))
    return out
