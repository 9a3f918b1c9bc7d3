"""The tuning ruleset: the ``[tuning]`` table, and the trials it draws from a cell's search space.

The same rule for every estimator, built-in or not (AlgoPerf's external tuning ruleset, Dahl et
al. 2023): each estimator gets exactly ``trials`` points from its own space joined with the
task's (``lr``), and each point is a cell of the matrix. ``quasirandom`` draws scrambled Halton
points (``scipy.stats.qmc``) seeded by ``seed``, so the same config always yields the same
trials, and two estimators with the same space get the same points; ``grid`` spreads the budget
over an even grid. Selection among the trials reads the ``select`` metric, a validation metric
(``val/...``) and never a test one.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

import numpy as np
from scipy.stats import qmc

from estimators.params import Choice, Dimension, Range
from harness.errors import ConfigError

__all__ = ["METHODS", "Axis", "Ruleset", "draw", "read_ruleset"]

Method = Literal["grid", "quasirandom"]
METHODS: tuple[str, ...] = get_args(Method)
DIRECTIONS = ("min", "max")
KEYS = ("trials", "method", "seed", "select")
SELECT_KEYS = ("metric", "direction")
VALIDATION = "val/"  # selection reads only validation metrics
DIGITS = 3  # significant digits of a drawn float: readable cell names, the same ids everywhere
MAX_DRAWS = 100  # quasirandom: draws per trial before a small space is called too small


@dataclass(frozen=True)
class Ruleset:
    """A checked ``[tuning]`` table. ``metric`` empty: each task's ``select_metric``."""

    trials: int
    method: Method = "quasirandom"
    seed: int = 0
    metric: str = ""
    direction: str = "min"

    def record(self, select_metric: str) -> str:
        """The ruleset as a cell records it (JSON), with the metric the cell is selected on."""
        return json.dumps({**asdict(self), "metric": self.metric or select_metric}, sort_keys=True)


@dataclass(frozen=True)
class Axis:
    """One searched parameter of a cell: ``key`` is ``task.NAME`` or ``estimator.NAME``."""

    key: str
    dim: Dimension
    default: Any

    @property
    def name(self) -> str:
        return self.key.partition(".")[2]


def _int(where: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{where} = {value!r} must be an integer >= {low}")
    return value


def read_ruleset(config: Mapping[str, Any]) -> Ruleset | None:
    """The config's ``[tuning]`` table checked, or ``None`` when there is none or ``trials = 0``
    (no tuning: every cell runs with its configured values, as before)."""
    table = config.get("tuning")
    if table is None:
        return None
    if not isinstance(table, Mapping):
        raise ConfigError(f"[tuning] must be a table, not {table!r}")
    for key in table:
        if key not in KEYS:
            raise ConfigError(f"[tuning]: unknown key {key!r}; known: {', '.join(KEYS)}")
    if "trials" not in table:
        raise ConfigError("[tuning]: trials is missing; give the number of trials per estimator")
    trials = _int("[tuning] trials", table["trials"], 0)
    seed = _int("[tuning] seed", table.get("seed", 0), 0)
    method = table.get("method", "quasirandom")
    if method not in METHODS:
        raise ConfigError(f"[tuning] method = {method!r} is not one of {', '.join(METHODS)}")
    select = table.get("select", {})
    if not isinstance(select, Mapping):
        raise ConfigError(f"[tuning] select must be a table (metric, direction), not {select!r}")
    for key in select:
        if key not in SELECT_KEYS:
            raise ConfigError(f"[tuning] select: unknown key {key!r}; known: {', '.join(SELECT_KEYS)}")
    metric = select.get("metric", "")
    if not isinstance(metric, str) or (metric and not metric.startswith(VALIDATION)):
        raise ConfigError(
            f"[tuning] select metric = {metric!r} must be a validation metric ({VALIDATION}...): "
            "trials are never chosen on test data"
        )
    direction = select.get("direction", "min")
    if direction not in DIRECTIONS:
        raise ConfigError(f"[tuning] select direction = {direction!r} is not one of {', '.join(DIRECTIONS)}")
    return Ruleset(trials, method, seed, metric, direction) if trials else None


def _round(value: float) -> float:
    return float(f"{value:.{DIGITS}g}")


def _from_unit(axis: Axis, u: float) -> Any:
    """The value at ``u`` in [0, 1) along ``axis``."""
    dim = axis.dim
    if isinstance(dim, Choice):
        return dim.values[min(int(u * len(dim.values)), len(dim.values) - 1)]
    integer = isinstance(axis.default, int)
    low, high = dim.low, dim.high
    if integer:  # each integer an equal share of the (log) line
        low, high = low - 0.5, high + 0.5
        if dim.scale == "log":
            low = max(low, dim.low / 2)  # stays positive
    if dim.scale == "log":
        value = math.exp(math.log(low) + u * (math.log(high) - math.log(low)))
    else:
        value = low + u * (high - low)
    if integer:
        return int(min(max(round(value), dim.low), dim.high))
    return min(max(_round(value), dim.low), dim.high)


def _levels(axis: Axis, k: int) -> list[Any]:
    """``k`` evenly spread values of a range (ends included), fewer where ints coincide."""
    if isinstance(axis.dim, Choice):
        return list(axis.dim.values)
    dim = axis.dim
    points = [0.5] if k == 1 else [i / (k - 1) for i in range(k)]
    if dim.scale == "log":
        raw = [math.exp(math.log(dim.low) + p * (math.log(dim.high) - math.log(dim.low))) for p in points]
    else:
        raw = [dim.low + p * (dim.high - dim.low) for p in points]
    if isinstance(axis.default, int):
        return list(dict.fromkeys(int(min(max(round(v), dim.low), dim.high)) for v in raw))
    return list(dict.fromkeys(min(max(_round(v), dim.low), dim.high) for v in raw))


def _key(point: Mapping[str, Any]) -> str:
    return json.dumps(point, sort_keys=True, default=str)


def _too_small(where: str, axes: Sequence[Axis], found: int, trials: int) -> ConfigError:
    space = "; ".join(f"{a.key} {a.dim}" for a in axes)
    return ConfigError(
        f"{where}: its space ({space}) holds only {found} distinct points, fewer than [tuning] "
        f"trials = {trials}; widen the space or lower trials"
    )


def _grid(where: str, axes: Sequence[Axis], trials: int) -> list[dict[str, Any]]:
    """The coarsest even grid with at least ``trials`` points, thinned evenly to ``trials``."""
    ranged = any(isinstance(a.dim, Range) for a in axes)
    for k in range(1, trials + 1):
        grid = [dict(zip((a.key for a in axes), combo, strict=True))
                for combo in itertools.product(*(_levels(a, k) for a in axes))]  # fmt: skip
        if len(grid) >= trials or not ranged:
            break
    if len(grid) < trials:
        raise _too_small(where, axes, len(grid), trials)
    picks = np.linspace(0, len(grid) - 1, trials).round().astype(int)
    return [grid[i] for i in picks]


def _quasirandom(where: str, axes: Sequence[Axis], trials: int, seed: int) -> list[dict[str, Any]]:
    """The first ``trials`` distinct points of a scrambled Halton sequence, mapped onto ``axes``."""
    sampler = qmc.Halton(len(axes), scramble=True, seed=seed)
    points: dict[str, dict[str, Any]] = {}
    for _ in range(MAX_DRAWS):
        for row in sampler.random(trials):
            point = {a.key: _from_unit(a, float(u)) for a, u in zip(axes, row, strict=True)}
            points.setdefault(_key(point), point)
            if len(points) == trials:
                return list(points.values())
    raise _too_small(where, axes, len(points), trials)


def draw(where: str, axes: Sequence[Axis], ruleset: Ruleset) -> list[dict[str, Any]]:
    """Exactly ``ruleset.trials`` distinct points (``{axis key: value}``) of the space ``axes``;
    the same ``axes`` and ruleset always give the same points, in the same order."""
    if ruleset.method == "grid":
        return _grid(where, axes, ruleset.trials)
    return _quasirandom(where, axes, ruleset.trials, ruleset.seed)
