"""The ``dense`` estimator: the reference point with no discrete structure to estimate.

- ``sparse_matrix``: a dense weight learned directly.
- ``glimpse``: no glimpse; the task classifies from the source network (the paper's baseline).
- ``permutation`` from keys: the deterministic NeuralSort relaxation (Grover et al. 2019).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from estimators.base import (
    Estimator,
    FullImageReadout,
    GlimpseSpec,
    PermutationSpec,
    SparseMatrixSpec,
    Spec,
    StructureLayer,
    Unsupported,
    hookimpl,
)

__all__ = ["DenseEstimator", "register_estimators"]


class DenseEstimator(Estimator):
    name: ClassVar[str] = "dense"
    description: ClassVar[str] = "dense baselines: full weight, whole-image ConvNet, NeuralSort"
    kinds: ClassVar[frozenset[str]] = frozenset({"sparse_matrix", "glimpse", "permutation"})
    defaults: ClassVar[Mapping[str, Any]] = {"tau": 1.0}  # NeuralSort temperature
    positive: ClassVar[tuple[str, ...]] = ("tau",)

    def unsupported(self, spec: Spec, params: Mapping[str, Any] | None = None) -> str | None:
        if isinstance(spec, PermutationSpec) and spec.source != "keys":
            return "dense answers a free permutation with its sparse_matrix form"
        return super().unsupported(spec, params)

    def build(self, spec: Spec, params: Mapping[str, Any]) -> StructureLayer:
        reason = self.unsupported(spec, params)
        if reason:
            raise Unsupported(reason)
        if isinstance(spec, SparseMatrixSpec):
            from estimators.layers.matrix import DenseMatrixLayer

            return DenseMatrixLayer(spec)
        if isinstance(spec, GlimpseSpec):
            return FullImageReadout()
        from estimators.layers.permutation import NeuralSortLayer

        return NeuralSortLayer(spec, tau={**self.defaults, **params}["tau"])


@hookimpl
def register_estimators(register: Callable[[Estimator], None]) -> None:
    register(DenseEstimator())
