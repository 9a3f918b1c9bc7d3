"""The ``perturbed`` estimator: perturbed optimizers (Berthet et al. 2020, "Learning with
Differentiable Perturbed Optimizers").

The structure in training is the Monte-Carlo mean of the hard solution under Gaussian noise on
its scores, ``y_sigma(theta) = E[y*(theta + sigma Z)]`` over ``samples`` draws per instance, and
its Jacobian is their Monte-Carlo identity ``J = E[y*(theta + sigma Z) Z^T] / sigma`` (§3.1,
Prop. 3.1), both from the same draws, as the authors' ``perturbations`` library computes them.
The identity is Stein's lemma, so it holds for any solution map, which lets one code path serve:

- ``sparse_matrix``: ``y*`` is the top-``k`` mask of one score per entry of ``W``; ``W`` is the
  (soft, in training) mask times a free value per entry (``estimators.shared.perturb``);
- ``permutation``: ``y*`` is the ascending sort matrix of the keys; ``source="free"`` learns the
  ``n`` keys themselves.

``eval()``: the hard solution of the unperturbed scores.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from estimators.base import (
    Estimator,
    PermutationOutput,
    PermutationSpec,
    SparseMatrixSpec,
    StructureLayer,
    hookimpl,
)
from estimators.params import Range
from estimators.shared.neuralsort import sort_matrix
from estimators.shared.perturb import Keys, MaskedMatrix, topk_mask

__all__ = [
    "PerturbedEstimator",
    "PerturbedMatrixLayer",
    "PerturbedSortLayer",
    "perturbed",
    "register_estimators",
]

Oracle = Callable[[Tensor], Tensor]


class PerturbedEstimator(Estimator):
    name: ClassVar[str] = "perturbed"
    description: ClassVar[str] = (
        "perturbed optimizers (Berthet et al. 2020): Gaussian-smoothed top-k / sort, Monte-Carlo Jacobian"
    )
    kinds: ClassVar[frozenset[str]] = frozenset({"sparse_matrix", "permutation"})
    defaults: ClassVar[Mapping[str, Any]] = {"samples": 100, "sigma": 0.05}
    positive: ClassVar[tuple[str, ...]] = ("samples", "sigma")
    space: ClassVar[Mapping[str, Any]] = {"sigma": Range(0.01, 1.0, "log")}  # docs/protocols.md, Tuning

    def build_sparse_matrix(self, spec: SparseMatrixSpec, params: Mapping[str, Any]) -> StructureLayer:
        return PerturbedMatrixLayer(spec, samples=params["samples"], sigma=params["sigma"])

    def build_permutation(self, spec: PermutationSpec, params: Mapping[str, Any]) -> StructureLayer:
        return PerturbedSortLayer(spec, samples=params["samples"], sigma=params["sigma"])


class _Perturbed(torch.autograd.Function):
    """``forward``: mean of ``oracle(theta + sigma Z_m)`` over ``m``; ``backward``: the vector-Jacobian
    product of the identity, ``mean_m <y_m, g> Z_m / sigma``."""

    @staticmethod
    def forward(ctx, theta: Tensor, noise: Tensor, sigma: float, oracle: Oracle) -> Tensor:
        hard = oracle(theta.detach() + sigma * noise)  # (M, b, *event)
        ctx.save_for_backward(hard, noise)
        ctx.sigma = sigma
        return hard.mean(0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        hard, noise = ctx.saved_tensors
        inner = (hard * grad).flatten(2).sum(-1)  # (M, b): <y_m, g> per draw and instance
        return (inner.unsqueeze(-1) * noise).mean(0) / ctx.sigma, None, None, None


def perturbed(theta: Tensor, oracle: Oracle, samples: int, sigma: float,
              generator: torch.Generator | None = None) -> Tensor:
    """``E[oracle(theta + sigma Z)]`` over ``samples`` draws, differentiable by Berthet et al.'s identity.

    ``theta (b, d)``; ``oracle`` maps ``(M, b, d)`` to ``(M, b, *event)``; returns ``(b, *event)``.
    """
    noise = torch.randn((samples, *theta.shape), generator=generator, device=theta.device, dtype=theta.dtype)
    return _Perturbed.apply(theta, noise, sigma, oracle)


def _check(samples: int, sigma: float) -> None:
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")


class PerturbedMatrixLayer(StructureLayer):
    """``W = E[topk(scores + sigma Z)] * values`` in training (one Monte-Carlo mean per instance);
    ``eval()``: ``topk(scores) * values``."""

    def __init__(self, spec: SparseMatrixSpec, *, samples: int = 100, sigma: float = 0.05) -> None:
        super().__init__()
        _check(samples, sigma)
        self.matrix = MaskedMatrix(spec)
        # noise draws inside one forward; not ``samples``, the contract's rows per instance
        self.noise_samples, self.sigma = samples, sigma

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        self.matrix.check(x)
        scores, k = self.matrix.scores, self.matrix.k
        if not self.training:
            return self.matrix.product(x, topk_mask(scores.detach(), k))
        theta = scores.expand(x.shape[0], -1)  # (b, entries): each instance its own draws
        mask = perturbed(theta, lambda s: topk_mask(s, k), self.noise_samples, self.sigma, generator)
        return self.matrix.product(x, mask)

    def snapshot(self) -> dict[str, Tensor]:
        return self.matrix.snapshot()


class PerturbedSortLayer(StructureLayer):
    """``E[sort_matrix(keys + sigma Z)]`` in training; ``eval()``: ``sort_matrix(keys)``.

    ``source="keys"`` sorts the task's keys, ``source="free"`` ``n`` learned keys (``Keys``).
    """

    def __init__(self, spec: PermutationSpec, *, samples: int = 100, sigma: float = 0.05) -> None:
        super().__init__()
        _check(samples, sigma)
        self.spec, self.keys = spec, Keys(spec)
        # noise draws inside one forward; not ``samples``, the contract's rows per instance
        self.noise_samples, self.sigma = samples, sigma

    def forward(self, inputs: Tensor | int, generator: torch.Generator | None = None) -> PermutationOutput:
        keys = self.keys(inputs)
        if not self.training:
            return PermutationOutput(steps=[sort_matrix(keys.detach())])
        return PermutationOutput(steps=[perturbed(keys, _sort, self.noise_samples, self.sigma, generator)])

    def snapshot(self) -> dict[str, Tensor]:
        return {} if self.keys.free is None else {"keys": self.keys.free.detach().cpu()}


def _sort(keys: Tensor) -> Tensor:
    """``sort_matrix`` over any leading axes: ``(..., n)`` -> ``(..., n, n)``."""
    return sort_matrix(keys.reshape(-1, keys.shape[-1])).view(*keys.shape, keys.shape[-1])


@hookimpl
def register_estimators(register: Callable[[Estimator], None]) -> None:
    register(PerturbedEstimator())
