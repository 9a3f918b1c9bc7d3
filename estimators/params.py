"""The parameter machinery that tasks and estimators share: what a plugin declares about its
parameters, the one error for a bad value, the one type for structure kinds, and their checks.

``harness.task.Task`` and ``estimators.base.Estimator`` both derive from ``Parameters``, so a task
and an estimator declare parameters the same way and the harness checks them in one place. It
lives in ``estimators`` because estimators import nothing from the harness, while the harness may
import this.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

__all__ = [
    "KINDS",
    "Choice",
    "Dimension",
    "Kind",
    "Kinds",
    "ParamError",
    "Parameters",
    "Range",
    "Scale",
    "check_numbers",
    "in_space",
    "kinds_problem",
    "space_dimension",
    "space_problems",
]

#: The fixed vocabulary that joins tasks and estimators.
Kind = Literal["sparse_matrix", "permutation", "glimpse"]
KINDS: tuple[str, ...] = get_args(Kind)
#: The kinds a plugin serves: a task's, most preferred first, as a tuple; an estimator's order is
#: not read, and a set (the older form) is accepted.
Kinds = Collection[Kind]


class ParamError(ValueError):
    """A bad parameter value, raised by ``check`` with a message naming the key; the CLI prints it
    as one line with exit code 2, before anything runs. A ``ValueError``, so plugins that raise
    ``ValueError`` (estimators) or ``harness.errors.UsageError`` (tasks) keep working."""


class Parameters:
    """Parameter declarations, as class attributes of a task or estimator:

    - ``defaults``: every parameter with its default; a config may set only these keys, and each
      value must have its default's type (ints pass for floats; list items like the first item).
    - ``choices``: for parameters with a fixed set of values, that set.
    - ``positive`` / ``non_negative``: numeric parameters (or lists of numbers) that must be
      > 0 / >= 0. Every float must be finite whatever is declared.
    - ``check(params)``: raise ``ParamError`` naming the key for any other bad value; called with
      the resolved parameters before anything runs.
    - ``space``: the values a tuning ruleset (``[tuning]``) may try for a parameter: a ``Range``
      (numbers between two bounds on a linear or log scale; an int default makes it an integer
      range) or a ``Choice`` (a list or tuple of values is short for one). Every estimator gets
      the same number of trials drawn from its own space joined with the task's (``lr``), so a
      plugin declares here what it would otherwise have to be hand-tuned on. Each default must
      lie in its space.
    """

    defaults: ClassVar[Mapping[str, Any]] = {}
    choices: ClassVar[Mapping[str, tuple[Any, ...]]] = {}
    space: ClassVar[Mapping[str, Range | Choice | Collection[Any]]] = {}
    positive: ClassVar[tuple[str, ...]] = ()
    non_negative: ClassVar[tuple[str, ...]] = ()

    def check(self, params: Mapping[str, Any]) -> None:
        return None


Scale = Literal["linear", "log"]
SCALES: tuple[str, ...] = get_args(Scale)


@dataclass(frozen=True)
class Range:
    """Numbers from ``low`` to ``high`` (both included), spread evenly on ``scale``; rounded to
    integers when the parameter's default is an int. ``kinds``: searched only in cells whose
    structure is one of these kinds (empty: every kind), for a parameter that only one kind of
    layer reads."""

    low: float
    high: float
    scale: Scale = "linear"
    kinds: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"[{self.low:g}, {self.high:g}] {self.scale}"


@dataclass(frozen=True)
class Choice:
    """A fixed list of values to try, in order (a grid takes them as given)."""

    values: tuple[Any, ...]
    kinds: tuple[str, ...] = ()

    def __str__(self) -> str:
        return "one of " + ", ".join(map(repr, self.values))


Dimension = Range | Choice


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def space_dimension(declared: Any) -> Dimension:
    """A declared space entry as a ``Range`` or ``Choice`` (a list or tuple is a ``Choice``);
    anything else is returned unchanged for ``space_problems`` to name."""
    if isinstance(declared, (list, tuple)):
        return Choice(tuple(declared))
    return declared


def in_space(dim: Dimension, value: Any) -> bool:
    """Whether ``value`` is one the dimension may yield (a range's bounds included)."""
    if isinstance(dim, Choice):
        return value in dim.values
    return _number(value) and dim.low <= value <= dim.high


def _dimension_problem(key: str, dim: Any, default: Any) -> str | None:
    if isinstance(dim, Range):
        if not all(_number(v) and math.isfinite(v) for v in (dim.low, dim.high)):
            return f"space {key}: bounds {dim.low!r}, {dim.high!r} must be finite numbers"
        if not dim.low < dim.high:
            return f"space {key}: low {dim.low!r} must be below high {dim.high!r}"
        if dim.scale not in SCALES:
            return f"space {key}: scale {dim.scale!r} must be one of {', '.join(SCALES)}"
        if dim.scale == "log" and dim.low <= 0:
            return f"space {key}: a log scale needs low > 0, got {dim.low!r}"
        if not _number(default):
            return f"space {key}: a range needs a numeric default, not {default!r}"
    elif isinstance(dim, Choice):
        if not dim.values:
            return f"space {key}: the list of values is empty"
        wrong = [v for v in dim.values if not _same_type(v, default)]
        if wrong:
            return f"space {key}: {wrong[0]!r} is not a {type(default).__name__} like its default {default!r}"
    else:
        return f"space {key}: {dim!r} must be a Range, a Choice or a list of values"
    if set(dim.kinds) - set(KINDS):
        return f"space {key}: kinds {dim.kinds!r} must be drawn from {KINDS}"
    if not in_space(dim, default):
        return f"space {key}: the default {default!r} lies outside it ({dim})"
    return None


def _same_type(value: Any, default: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return _number(value)
    return isinstance(value, type(default))


def space_problems(owner: Parameters) -> list[str]:
    """What is wrong with ``owner.space``: a key that is not a parameter, a malformed range or
    list, a default outside its space. The matrix and ``check-plugin`` both report these."""
    space = owner.space
    if not isinstance(space, Mapping):
        return [f"space must be a mapping, got {type(space).__name__}"]
    problems = []
    for key, declared in space.items():
        if key not in owner.defaults:
            problems.append(f"space names {key!r}, which is not among the defaults")
            continue
        dim = space_dimension(declared)
        problem = _dimension_problem(key, dim, owner.defaults[key])
        if problem is None and key in owner.choices and isinstance(dim, Choice):
            outside = [v for v in dim.values if v not in owner.choices[key]]
            if outside:
                problem = f"space {key}: {outside[0]!r} is not among its choices {owner.choices[key]!r}"
        if problem:
            problems.append(problem)
    return problems


def kinds_problem(kinds: object) -> str | None:
    """Why ``kinds`` is not a non-empty collection drawn from ``KINDS``; ``None`` if it is."""
    if isinstance(kinds, str) or not isinstance(kinds, Collection) or not kinds or set(kinds) - set(KINDS):
        return f"kinds {kinds!r} must be a non-empty collection drawn from {KINDS}"
    return None


def _numbers(value: Any) -> list[int | float]:
    items = value if isinstance(value, list) else [value]
    return [v for v in items if isinstance(v, (int, float)) and not isinstance(v, bool)]


def check_numbers(
    owner: Parameters,
    params: Mapping[str, Any],
    positive: Collection[str] = (),
    non_negative: Collection[str] = (),
) -> None:
    """The sanity every parameter gets: floats finite, ints within 64 bits, and the signs that
    ``owner`` declares (plus ``positive`` / ``non_negative``: what the runner itself reads)."""
    positive = {*owner.positive, *positive}
    non_negative = {*owner.non_negative, *non_negative}
    for key, value in params.items():
        for number in _numbers(value):
            if isinstance(number, float) and not math.isfinite(number):
                raise ParamError(f"{key} = {number!r} must be a finite number")
            if isinstance(number, int) and abs(number) >= 2**63:
                raise ParamError(f"{key} = {number!r} does not fit in 64 bits")
            if key in positive and number <= 0:
                raise ParamError(f"{key} = {number!r} must be positive")
            if key in non_negative and number < 0:
                raise ParamError(f"{key} = {number!r} must not be negative")
