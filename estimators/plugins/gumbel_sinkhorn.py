"""The ``gumbel_sinkhorn`` estimator (Mena et al. 2018): permutations only.

Log-space Sinkhorn over Gumbel-perturbed scores; the hard permutation at evaluation is the
Hungarian solution (scipy's ``linear_sum_assignment``). On identity it learns ``n x n`` logits;
on sorting it reads ``n`` scores per item (one per output position) from the task's network, as
Mena et al.'s sorting networks do. It has no glimpse, so attention cells are n/a.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from estimators.base import Estimator, PermutationSpec, Spec, StructureLayer, Unsupported, hookimpl

__all__ = ["GumbelSinkhornEstimator", "register_estimators"]


class GumbelSinkhornEstimator(Estimator):
    name: ClassVar[str] = "gumbel_sinkhorn"
    description: ClassVar[str] = "Gumbel-Sinkhorn relaxation, Hungarian matching at evaluation"
    kinds: ClassVar[frozenset[str]] = frozenset({"permutation"})
    defaults: ClassVar[Mapping[str, Any]] = {"temperature": 1.0, "iterations": 20, "noise": 1.0}
    positive: ClassVar[tuple[str, ...]] = ("temperature", "iterations")
    non_negative: ClassVar[tuple[str, ...]] = ("noise",)  # 0: deterministic Sinkhorn

    def build(self, spec: Spec, params: Mapping[str, Any]) -> StructureLayer:
        if not isinstance(spec, PermutationSpec):
            raise Unsupported(self.unsupported(spec) or "permutations only")
        from estimators.layers.permutation import GumbelSinkhornLayer

        p = {**self.defaults, **params}
        return GumbelSinkhornLayer(
            spec, temperature=p["temperature"], iterations=p["iterations"], noise=p["noise"]
        )


@hookimpl
def register_estimators(register: Callable[[Estimator], None]) -> None:
    register(GumbelSinkhornEstimator())
