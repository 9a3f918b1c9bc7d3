"""The ``dense`` estimator: the reference point with no discrete structure to estimate.

- ``sparse_matrix``: a dense weight learned directly, ``DenseMatrixLayer``.
- ``glimpse``: no glimpse (``FullImageReadout``); the task classifies from the source network (the
  paper's baseline).
- ``permutation`` from keys: NeuralSort (Grover et al. 2019), ``NeuralSortLayer``: the
  deterministic relaxation (``gumbel_samples = 0``, the default), or stochastic NeuralSort
  (``gumbel_samples = S >= 1``): the relaxation of ``S`` Gumbel-perturbed copies of every
  instance's keys, a relaxed sample of the Plackett-Luce distribution each (Grover et al. 2019;
  their ``n_s``, 5 in ermongroup/neuralsort ``tf/run_sort.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from estimators.base import (
    Estimator,
    FullImageReadout,
    GlimpseSpec,
    Outcomes,
    PermutationOutput,
    PermutationSpec,
    SparseMatrixSpec,
    Spec,
    StructureLayer,
    hookimpl,
)
from estimators.params import Choice
from estimators.shared.neuralsort import neuralsort, sort_matrix
from estimators.shared.permutation import check_keys, check_positive, keys_only
from estimators.shared.plackett_luce import all_orderings, perm_matrix
from estimators.shared.sinkhorn import gumbel_noise
from estimators.sparse import weight_shape

__all__ = ["DenseEstimator", "DenseMatrixLayer", "NeuralSortLayer", "register_estimators"]


class DenseEstimator(Estimator):
    name: ClassVar[str] = "dense"
    description: ClassVar[str] = (
        "dense baselines: full weight, whole-image ConvNet, deterministic or stochastic NeuralSort "
        "(Grover et al. 2019)"
    )
    kinds: ClassVar[frozenset[str]] = frozenset({"sparse_matrix", "glimpse", "permutation"})
    defaults: ClassVar[Mapping[str, Any]] = {
        "tau": 1.0,  # NeuralSort temperature
        # permutation: 0 = deterministic NeuralSort; S >= 1 = stochastic NeuralSort with S
        # Gumbel-perturbed samples per instance (Grover et al.'s n_s)
        "gumbel_samples": 0,
    }
    positive: ClassVar[tuple[str, ...]] = ("tau",)
    non_negative: ClassVar[tuple[str, ...]] = ("gumbel_samples",)
    # Grover et al. 2019 (D.1) choose NeuralSort's temperature from this grid on validation data;
    # only the NeuralSort layer (permutation) reads it
    space: ClassVar[Mapping[str, Any]] = {"tau": Choice((1.0, 2.0, 4.0, 8.0, 16.0), kinds=("permutation",))}

    def unsupported(self, spec: Spec, params: Mapping[str, Any] | None = None) -> str | None:
        if isinstance(spec, PermutationSpec) and spec.source != "keys":
            return "dense answers a free permutation with its sparse_matrix form"
        return super().unsupported(spec, params)

    def build_sparse_matrix(self, spec: SparseMatrixSpec, params: Mapping[str, Any]) -> StructureLayer:
        return DenseMatrixLayer(spec)

    def build_glimpse(self, spec: GlimpseSpec, params: Mapping[str, Any]) -> StructureLayer:
        return FullImageReadout()

    def build_permutation(self, spec: PermutationSpec, params: Mapping[str, Any]) -> StructureLayer:
        return NeuralSortLayer(spec, tau=params["tau"], gumbel_samples=params["gumbel_samples"])


# ---- sparse_matrix ------------------------------------------------------------------------------


class DenseMatrixLayer(StructureLayer):
    """A dense weight of shape ``out_shape + in_shape`` learned directly (the unstructured baseline).

    Initialised like PyTorch's ``nn.Linear`` (uniform in ``+-1/sqrt(fan_in)``), the default that
    the paper's appendix uses for standard layers.
    """

    def __init__(self, spec: SparseMatrixSpec) -> None:
        super().__init__()
        self.in_shape, self.out_shape = tuple(spec.in_shape), tuple(spec.out_shape)
        weight_shape(self.in_shape, self.out_shape)  # validates the spec
        bound = math.prod(self.in_shape) ** -0.5  # 1 / sqrt(fan_in)
        weight = torch.empty(*self.out_shape, *self.in_shape).uniform_(-bound, bound)
        self.weight = nn.Parameter(weight)

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        w = self.weight.reshape(-1, math.prod(self.in_shape))  # (prod(out), prod(in))
        return (x.reshape(b, -1) @ w.T).view(b, *self.out_shape)

    def snapshot(self) -> dict[str, Tensor]:
        return {"weight": self.weight.detach().cpu()}


# ---- permutation --------------------------------------------------------------------------------


class NeuralSortLayer(StructureLayer):
    """NeuralSort (Grover et al. 2019); ``eval()``: the argsort matrix of the keys.

    ``gumbel_samples = 0``: deterministic, the relaxation of the keys. ``gumbel_samples = S``:
    stochastic NeuralSort, ``S`` samples per instance (the contract's ``samples``), each row
    relaxing ``keys - G`` with ``G`` standard Gumbel noise: its hard limit sorts a sample of the
    Plackett-Luce distribution of the keys (Grover et al.'s ``s + g`` for descending scores
    ``s = -keys``), and the relaxation's gradient is the reparametrised one.
    """

    def __init__(self, spec: PermutationSpec, *, tau: float = 1.0, gumbel_samples: int = 0):
        super().__init__()
        reason = self.unsupported(spec)
        if reason:
            raise ValueError(reason)
        check_positive("tau", tau)
        if gumbel_samples < 0:
            raise ValueError(f"gumbel_samples must be >= 0 (0: deterministic), got {gumbel_samples}")
        self.spec, self.tau = spec, tau
        self.stochastic = gumbel_samples > 0
        self.samples = max(gumbel_samples, 1)

    @staticmethod
    def unsupported(spec: PermutationSpec) -> str | None:
        return keys_only(spec, "neuralsort")

    def forward(self, keys: torch.Tensor, generator: torch.Generator | None = None) -> PermutationOutput:
        check_keys(keys, self.spec.n)
        if not self.training:
            return PermutationOutput(steps=[sort_matrix(keys.detach())])
        if self.stochastic:
            noise = gumbel_noise(tuple(keys.shape), generator=generator, device=keys.device,
                                 dtype=keys.dtype)
            keys = keys - noise
        return PermutationOutput(steps=[neuralsort(keys, self.tau)])

    def outcomes(self, *inputs: Tensor) -> Outcomes | None:
        """Stochastic: the Plackett-Luce orderings of one instance's keys ``(1, n)``, the law of
        the sort of ``keys - G`` that the relaxation approaches as ``tau -> 0``, so the study
        measures the relaxation's bias against the gradient of the expected hard loss.
        Deterministic: ``None`` (no distribution)."""
        if not self.stochastic:
            return None
        (keys,) = inputs
        perms, log_probs = all_orderings(keys)
        return Outcomes(perm_matrix(perms, keys.dtype), log_probs)


@hookimpl
def register_estimators(register: Callable[[Estimator], None]) -> None:
    register(DenseEstimator())
