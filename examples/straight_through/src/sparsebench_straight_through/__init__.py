"""A sparsebench plugin: the straight-through Gumbel-softmax estimator (Jang et al. 2017, §2.2;
Bengio et al. 2013), for the ``sparse_matrix`` and ``permutation`` structure kinds.

Forward, every structure is a hard sample (a 0/1 matrix, a permutation); backward, the gradient is
that of its Gumbel-softmax relaxation (a softmax over inputs; NeuralSort over keys, Grover et al.
2019). ``eval()`` takes the noiseless argmax, so evaluation is deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from estimators.base import (
    Estimator,
    PermutationSpec,
    SparseMatrixSpec,
    Spec,
    StructureLayer,
    Unsupported,
    hookimpl,
)
from estimators.params import Range
from sparsebench_straight_through.layers import StraightThroughMatrix, StraightThroughSort

__all__ = ["StraightThrough", "register_estimators"]


class StraightThrough(Estimator):
    name: ClassVar[str] = "straight_through"
    description: ClassVar[str] = "straight-through Gumbel-softmax: hard samples forward, soft gradients back"
    kinds: ClassVar[frozenset[str]] = frozenset({"sparse_matrix", "permutation"})
    defaults: ClassVar[Mapping[str, Any]] = {
        "tau": 1.0,  # softmax temperature of the relaxation
        "noise": 1.0,  # scale of the Gumbel noise (0: deterministic straight-through)
    }
    # what a [tuning] ruleset searches besides the task's lr: the temperature, on a log scale
    space: ClassVar[Mapping[str, Any]] = {"tau": Range(0.25, 4.0, "log")}

    def check(self, params: Mapping[str, Any]) -> None:
        if params["tau"] <= 0:
            raise ValueError(f"tau = {params['tau']!r} must be > 0")
        if params["noise"] < 0:
            raise ValueError(f"noise = {params['noise']!r} must be >= 0")

    def unsupported(self, spec: Spec, params: Mapping[str, Any] | None = None) -> str | None:
        if isinstance(spec, SparseMatrixSpec) and spec.k != math.prod(spec.out_shape):
            outputs = math.prod(spec.out_shape)
            return f"straight_through picks one input per output: needs k = {outputs}, got k = {spec.k}"
        return super().unsupported(spec, params)

    def build(self, spec: Spec, params: Mapping[str, Any]) -> StructureLayer:
        reason = self.unsupported(spec, params)
        if reason:
            raise Unsupported(reason)
        if isinstance(spec, SparseMatrixSpec):
            return StraightThroughMatrix(spec, tau=params["tau"], noise=params["noise"])
        assert isinstance(spec, PermutationSpec)  # unsupported() turned every other kind away
        return StraightThroughSort(spec, tau=params["tau"], noise=params["noise"])


@hookimpl
def register_estimators(register: Callable[[Estimator], None]) -> None:
    register(StraightThrough())
