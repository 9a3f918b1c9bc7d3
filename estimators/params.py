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
from typing import Any, ClassVar, Literal, get_args

__all__ = ["KINDS", "Kind", "Kinds", "ParamError", "Parameters", "check_numbers", "kinds_problem"]

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

    (The fair-comparison issue adds a per-parameter search space here, beside ``choices``.)
    """

    defaults: ClassVar[Mapping[str, Any]] = {}
    choices: ClassVar[Mapping[str, tuple[Any, ...]]] = {}
    positive: ClassVar[tuple[str, ...]] = ()
    non_negative: ClassVar[tuple[str, ...]] = ()

    def check(self, params: Mapping[str, Any]) -> None:
        return None


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
