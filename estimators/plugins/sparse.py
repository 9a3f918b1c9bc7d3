"""The ``sparse`` estimator: the paper's sampled sparse hyperlayer for every structure kind.

- ``sparse_matrix``: Algorithm 1 with free parameters (identity task).
- ``glimpse``: one adaptive sparse layer per glimpse from the source network (attention).
- ``permutation`` from keys: differentiable quicksort from sparse half-permutations (sorting);
  needs n to be a power of two, else the cell is n/a.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from estimators.base import (
    Estimator,
    GlimpseSpec,
    PermutationSpec,
    SparseMatrixSpec,
    Spec,
    StructureLayer,
    Unsupported,
    hookimpl,
)

__all__ = ["SparseEstimator", "register_estimators"]


class SparseEstimator(Estimator):
    name: ClassVar[str] = "sparse"
    description: ClassVar[str] = "sampled sparse hyperlayer (Bloem et al. 2018, Algorithm 1)"
    kinds: ClassVar[frozenset[str]] = frozenset({"sparse_matrix", "glimpse", "permutation"})
    defaults: ClassVar[Mapping[str, Any]] = {
        "a_l": 2,  # local samples per continuous tuple
        "a_g": 2,  # global samples per continuous tuple
        "region": [],  # local sampling region per dimension; [] = log2 of each dimension
        "tau": 0.1,  # floor added to sigma (footnote 2)
        "chunk": 0,  # continuous tuples per gradient-accumulation pass; 0 = all at once
        # sparse_matrix: "pooled" spreads each tuple over all k tuples' samples (Algorithm 1 as
        # written); "tuple" over its own samples only (O(b k s), for very large k).
        "normalise": "pooled",
        # how pooled is computed: "truncated" evaluates only the pairs within a cut-off (each
        # tuple neglects less than ``tail`` of its weight); "all_pairs" is the exact O(b k^2 s)
        # reference (estimators/sparse/pooled.py derives the bound).
        "pooled": "truncated",
        "tail": 1e-6,
        # sparse_matrix: values fixed at 1, only the structure learned (the original identity
        # runs); with learned values the layer finds cancelling +/- pairs that rounding breaks.
        "fix_values": True,
        "box_offset": 1.0,  # glimpse: initial box half-width in logit space
        "C": 10.0,  # quicksort: sigmoid sharpness
        "samples": 0,  # quicksort: sampled half-permutations per step; 0 = n
    }

    choices: ClassVar[Mapping[str, tuple[Any, ...]]] = {
        "normalise": ("pooled", "tuple"),
        "pooled": ("truncated", "all_pairs"),
    }
    positive: ClassVar[tuple[str, ...]] = ("tau", "box_offset", "C", "tail")
    non_negative: ClassVar[tuple[str, ...]] = ("a_l", "a_g", "chunk", "samples")

    def check(self, params: Mapping[str, Any]) -> None:
        if not params["tail"] < 1:
            raise ValueError(f"tail = {params['tail']!r} must be below 1 (the weight a tuple may neglect)")
        if params["a_l"] + params["a_g"] < 1:
            raise ValueError(
                "a_l = a_g = 0 samples nothing beyond each tuple's nearest integer points, so no "
                "other position can be found; set a_l or a_g to at least 1"
            )
        region = params["region"]
        if not all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in region):
            raise ValueError(f"region = {region!r} must list positive integers (one per dimension), or be []")

    def unsupported(self, spec: Spec, params: Mapping[str, Any] | None = None) -> str | None:
        if isinstance(spec, PermutationSpec):
            if spec.source != "keys":
                return "sparse quicksort sorts keys; it learns no free permutation"
            if spec.n < 2 or spec.n & (spec.n - 1):
                return f"sparse quicksort needs n a power of two, got n={spec.n}"
        return super().unsupported(spec, params)

    def build(self, spec: Spec, params: Mapping[str, Any]) -> StructureLayer:
        reason = self.unsupported(spec, params)
        if reason:
            raise Unsupported(reason)
        p = {**self.defaults, **params}
        region = tuple(p["region"]) or None
        if isinstance(spec, SparseMatrixSpec):
            from estimators.layers.matrix import SparseMatrixLayer

            return SparseMatrixLayer(
                spec,
                a_l=p["a_l"],
                a_g=p["a_g"],
                region=region,
                tau=p["tau"],
                normalise=p["normalise"],
                pooled=p["pooled"],
                tail=p["tail"],
                fix_values=p["fix_values"],
                chunk=p["chunk"] or None,
            )
        if isinstance(spec, GlimpseSpec):
            from estimators.layers.glimpse import SparseGlimpse

            return SparseGlimpse(
                spec, box_offset=p["box_offset"], a_l=p["a_l"], a_g=p["a_g"], region=region, tau=p["tau"]
            )
        from estimators.layers.permutation import QuicksortLayer

        return QuicksortLayer(spec, C=p["C"], samples=p["samples"] or None)


@hookimpl
def register_estimators(register: Callable[[Estimator], None]) -> None:
    register(SparseEstimator())
