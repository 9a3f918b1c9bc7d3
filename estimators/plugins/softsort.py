"""The ``softsort`` estimator: SoftSort (Prillo and Eisenschlos 2020, "SoftSort: A Continuous
Relaxation for the argsort Operator"), permutations from keys only.

``P = softmax(-|sort(s) 1^T - 1 s^T| / tau)`` row-wise (their Eq. 1 with ``d = |.|``), in this
package's ascending convention: row ``i`` peaks on the item holding the ``i``-th smallest key.
With ``hard`` the forward is the sort matrix and the gradient SoftSort's (straight-through, their
§3 and the authors' ``hard=True``). ``eval()``: the sort matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from torch import Tensor

from estimators.base import Estimator, PermutationOutput, PermutationSpec, StructureLayer, hookimpl
from estimators.params import Range
from estimators.shared.neuralsort import sort_matrix
from estimators.shared.permutation import check_keys, check_positive, keys_only

__all__ = ["SoftSortEstimator", "SoftSortLayer", "register_estimators", "softsort"]


class SoftSortEstimator(Estimator):
    name: ClassVar[str] = "softsort"
    description: ClassVar[str] = "SoftSort (Prillo and Eisenschlos 2020): softmax(-|sort(s) - s| / tau)"
    kinds: ClassVar[frozenset[str]] = frozenset({"permutation"})
    defaults: ClassVar[Mapping[str, Any]] = {"tau": 1.0, "hard": False}
    positive: ClassVar[tuple[str, ...]] = ("tau",)
    space: ClassVar[Mapping[str, Any]] = {"tau": Range(0.01, 10.0, "log")}  # docs/protocols.md, Tuning

    def unsupported(self, spec, params=None) -> str | None:
        if isinstance(spec, PermutationSpec):
            return keys_only(spec, "softsort")
        return super().unsupported(spec, params)

    def build_permutation(self, spec: PermutationSpec, params: Mapping[str, Any]) -> StructureLayer:
        return SoftSortLayer(spec, tau=params["tau"], hard=params["hard"])


def softsort(keys: Tensor, tau: float = 1.0, hard: bool = False) -> Tensor:
    """Ascending SoftSort, ``(b, n)`` keys -> ``(b, n, n)`` row-stochastic; ``hard``: straight-through."""
    check_positive("tau", tau)
    ordered = keys.sort(dim=-1).values  # (b, n)
    soft = (-(ordered.unsqueeze(-1) - keys.unsqueeze(-2)).abs() / tau).softmax(dim=-1)
    if not hard:
        return soft
    return sort_matrix(keys.detach()) + soft - soft.detach()


class SoftSortLayer(StructureLayer):
    """SoftSort of the task's keys in training; ``eval()``: the sort matrix."""

    def __init__(self, spec: PermutationSpec, *, tau: float = 1.0, hard: bool = False) -> None:
        super().__init__()
        reason = keys_only(spec, "softsort")
        if reason:
            raise ValueError(reason)
        check_positive("tau", tau)
        self.spec, self.tau, self.hard = spec, tau, hard

    def forward(self, keys: Tensor) -> PermutationOutput:
        check_keys(keys, self.spec.n)
        if not self.training:
            return PermutationOutput(steps=[sort_matrix(keys.detach())])
        return PermutationOutput(steps=[softsort(keys, self.tau, self.hard)])


@hookimpl
def register_estimators(register: Callable[[Estimator], None]) -> None:
    register(SoftSortEstimator())
