"""The ``sparse`` estimator: the paper's sampled sparse hyperlayer for every structure kind.

- ``sparse_matrix``: Algorithm 1 with free parameters (identity task), ``SparseMatrixLayer``.
- ``glimpse``: one adaptive sparse layer per glimpse from the source network (attention),
  ``SparseGlimpseLayer``.
- ``permutation`` from keys: differentiable quicksort from sparse half-permutations (sorting),
  ``QuicksortLayer``; needs n to be a power of two, else the cell is n/a.

The maths lives in the harness-free library ``estimators.sparse``; these layers wrap it in the
plugin contract.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from estimators.base import (
    Estimator,
    GlimpseLayer,
    GlimpseSpec,
    PermutationOutput,
    PermutationSpec,
    SparseMatrixSpec,
    Spec,
    StructureLayer,
    hookimpl,
)
from estimators.params import Range
from estimators.shared.permutation import check_keys, check_positive, keys_only
from estimators.sparse import SparseGlimpse, SparseLayer, default_region
from estimators.sparse.functional import DEFAULT_TAIL, Normalise, PooledForm
from estimators.sparse.quicksort import quicksort

__all__ = [
    "QuicksortLayer",
    "SparseEstimator",
    "SparseGlimpseLayer",
    "SparseMatrixLayer",
    "register_estimators",
]


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
    # the sampling counts, where a preset does not pin the paper's (A.1 fixes them for identity
    # and attention); quicksort's a = n and C = 10 are the paper's and not searched
    space: ClassVar[Mapping[str, Any]] = {
        "a_l": Range(1, 32, "log", kinds=("sparse_matrix", "glimpse")),
        "a_g": Range(1, 32, "log", kinds=("sparse_matrix", "glimpse")),
    }

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

    def build_sparse_matrix(self, spec: SparseMatrixSpec, params: Mapping[str, Any]) -> StructureLayer:
        return SparseMatrixLayer(
            spec,
            a_l=params["a_l"],
            a_g=params["a_g"],
            region=tuple(params["region"]) or None,
            tau=params["tau"],
            normalise=params["normalise"],
            pooled=params["pooled"],
            tail=params["tail"],
            fix_values=params["fix_values"],
            chunk=params["chunk"] or None,
        )

    def build_glimpse(self, spec: GlimpseSpec, params: Mapping[str, Any]) -> StructureLayer:
        return SparseGlimpseLayer(
            spec,
            box_offset=params["box_offset"],
            a_l=params["a_l"],
            a_g=params["a_g"],
            region=tuple(params["region"]) or None,
            tau=params["tau"],
        )

    def build_permutation(self, spec: PermutationSpec, params: Mapping[str, Any]) -> StructureLayer:
        return QuicksortLayer(spec, C=params["C"], samples=params["samples"] or None)


# ---- sparse_matrix ------------------------------------------------------------------------------


class SparseMatrixLayer(StructureLayer):
    """The paper's sampled sparse layer (Algorithm 1) with ``spec.k`` free continuous tuples.

    Hyperparameters: ``a_l`` local and ``a_g`` global samples per tuple, the local ``region``
    (default ``ceil(log2 h)`` per dimension, as in the paper's identity experiments), ``tau`` (the
    variance floor), ``normalise``, ``fix_values`` and ``chunk`` (tuples per gradient-accumulation
    pass).

    ``normalise`` defaults to ``"pooled"``, the literal Algorithm 1 and the reference code: every
    tuple's density is normalised over the integer tuples sampled for *all* ``k`` tuples, so a
    tuple feels the loss at entries that only other tuples sampled. With ``"tuple"`` (cheaper,
    linear in ``k``) a tuple sees only its own few samples, and two tuples stuck on one entry never
    find the empty one: on the identity (n = 8, 16) the rounded-means loss stalls at 0.25-0.5.
    ``pooled`` picks how pooled is computed: ``"truncated"`` (default) evaluates only the pairs
    within a cut-off, neglecting less than ``tail`` of each tuple's weight (cost linear in ``k``
    for fixed relative sigmas); ``"all_pairs"`` is the exact ``O(b k^2 s)`` reference.
    ``fix_values=True`` (default False; see ``SparseLayer``) fixes every value at 1, as the
    reference identity experiment's ``fix_values`` flag; with learned values the identity
    converges to overlapping tuples of opposite-sign values whose rounded structure is wrong.
    """

    def __init__(
        self,
        spec: SparseMatrixSpec,
        *,
        a_l: int = 2,
        a_g: int = 2,
        region: Sequence[int] | None = None,
        tau: float = 0.1,
        normalise: Normalise = "pooled",
        pooled: PooledForm = "truncated",
        tail: float = DEFAULT_TAIL,
        fix_values: bool = False,
        chunk: int | None = None,
    ) -> None:
        super().__init__()
        self.sparse = SparseLayer(
            spec.in_shape, spec.out_shape, spec.k, a_l=a_l, a_g=a_g, region=region, tau=tau,
            normalise=normalise, pooled=pooled, tail=tail, chunk=chunk, fix_values=fix_values,
        )
        self._last_sample: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return self.sparse(x)
        indices = self.sparse.sample_batch(x.shape[0])  # (b, k, s, r), no gradient
        self._last_sample = indices[0].clone()  # (k, s, r): the first instance, for Fig. 3
        return self.sparse(x, indices=indices)

    def snapshot(self) -> dict[str, Tensor]:
        """Means and variances ``(k, r)`` in index space, values ``(k,)`` and, after a training
        forward, the integer tuples ``samples (k, s, r)`` of its first instance."""
        out = {
            "means": self.sparse.means().detach().cpu(),
            "sigmas": self.sparse.sigmas().detach().cpu(),
            "values": self.sparse.values.detach().cpu(),
        }
        if self._last_sample is not None:
            out["samples"] = self._last_sample.cpu()
        return out


# ---- glimpse ------------------------------------------------------------------------------------


class SparseGlimpseLayer(GlimpseLayer):
    """The paper's glimpse (section 3.2): ``estimators.sparse.SparseGlimpse`` behind the shared box.

    Each output pixel has one continuous index tuple; only its input row and column are learned and
    sampled (``2^2`` nearest + ``a_l`` local in ``region`` + ``a_g`` global integer tuples). One
    value per glimpse (shared by its connections) and one sigma per glimpse are free parameters.
    ``eval()`` reads the pixel at each rounded point. ``region=None`` samples locally in
    ``ceil(log2)`` of the image's height and width (the library default). ``chunk`` > 0 bounds
    memory (checkpointed chunks of that many tuples); 0 computes all tuples at once.
    """

    def __init__(
        self,
        spec: GlimpseSpec,
        box_offset: float = 1.0,
        a_l: int = 32,
        a_g: int = 16,
        region: Sequence[int] | None = (20, 20),
        tau: float = 0.1,
        chunk: int = 0,
    ) -> None:
        super().__init__(spec, box_offset)
        if region is None:  # the library's default: log2 of the image's height and width
            region = default_region(spec.image_shape[1:])
        self.core = SparseGlimpse(
            spec.image_shape,
            spec.size,
            spec.glimpses,
            a_l=a_l,
            a_g=a_g,
            region=tuple(region),
            tau=tau,
            chunk=chunk or None,
        )

    def forward(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        self.check_input(images, boxes)
        return self.core(images, self.corners(boxes))  # (b, g, c, k, k)

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {
            "values": self.core.values.detach().clone(),
            "sigmas_raw": self.core.sigmas_raw.detach().clone(),
        }


# ---- permutation --------------------------------------------------------------------------------


class QuicksortLayer(StructureLayer):
    """The paper's differentiable quicksort: ``log2 n`` sampled half-permutations (section 3.3).

    ``steps`` holds the half-permutations in order of application and the output is marked
    ``intermediate``: a task may put its loss on every intermediate state through the output's
    ``intermediate_inputs(x)`` and ``intermediate_targets(target)`` (sum ``BCE(x_d, t_d)`` over the
    pairs; clamping into ``(0, 1)`` first is the task's job, paper footnote 8).
    ``extras["keys"]`` is ``(b, log2 n + 1, n)``, the keys after every step.
    """

    def __init__(self, spec: PermutationSpec, *, C: float = 10.0, samples: int | None = None):
        super().__init__()
        reason = self.unsupported(spec)
        if reason:
            raise ValueError(reason)
        check_positive("C", C)
        if samples is not None and samples < 1:
            raise ValueError(f"samples must be >= 1 (or None for n), got {samples}")
        self.spec, self.C, self.half_samples = spec, C, samples
        self._last: torch.Tensor | None = None

    @staticmethod
    def unsupported(spec: PermutationSpec) -> str | None:
        if reason := keys_only(spec, "quicksort"):
            return reason
        n = spec.n
        if n < 2 or n & (n - 1):
            return f"quicksort needs n to be a power of two >= 2, got n={n}"
        return None

    def forward(
        self, keys: torch.Tensor, generator: torch.Generator | None = None
    ) -> PermutationOutput:
        check_keys(keys, self.spec.n)
        steps, trace = quicksort(
            keys, C=self.C, samples=self.half_samples, generator=generator, hard=not self.training
        )
        self._last = torch.stack([s[0].detach() for s in steps])  # (log2 n, n, n), instance 0
        return PermutationOutput(steps=steps, extras={"keys": trace}, intermediate=True)

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {} if self._last is None else {"steps": self._last}


@hookimpl
def register_estimators(register: Callable[[Estimator], None]) -> None:
    register(SparseEstimator())
