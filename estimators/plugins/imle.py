"""The ``imle`` estimator: implicit maximum-likelihood estimation (Niepert et al. 2021, "Implicit
MLE: Backpropagating Through Discrete Exponential Family Distributions").

Forward, perturb-and-MAP: the MAP state of the noisy scores, ``z = MAP(theta + tau eps)`` (the
mean of ``samples`` such states; one by default, so training sees a hard structure). Backward:
the target distribution ``theta' = theta - lambda dL/dz`` and the difference of MAP states under
the same noise, ``dL/dtheta ~ z - MAP(theta' + tau eps)`` (Alg. 2, "perturb-and-MAP" I-MLE),
divided by ``lambda`` when ``scale_grad`` is set (the authors' ``do_gradient_scaling``). It is a
biased estimate of the gradient of ``E[L(z)]``; its expectation over the noise is the finite
difference ``mu(theta) - mu(theta')`` of the perturb-and-MAP marginals (§3, Eq. 9), which tends
to ``lambda`` times that gradient as ``lambda -> 0``.

- ``sparse_matrix``: one score per entry of ``W``; the MAP oracle is the top-``k`` mask, with
  Sum-of-Gamma noise (the paper's choice for ``k``-subsets, §3.2) or Gumbel (``noise``); ``W`` is
  the mask times a free value per entry (``estimators.shared.perturb``).
- ``permutation``: Gumbel noise on the keys (perturb-and-MAP of the ascending sort is then an
  exact Plackett-Luce sample); the MAP of ``theta + tau eps`` is the sort matrix, the assignment
  problem with the rank-1 cost ``w (keys + tau eps)^T``; the target's cost ``w (keys + tau eps)^T
  - lambda dL/dP`` is no longer rank 1, so its MAP is the Hungarian solution, and the difference
  reaches the keys through ``w``. ``source="free"`` learns the ``n`` keys themselves.

``eval()``: the MAP state of the unperturbed scores.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from estimators.base import (
    Estimator,
    Outcomes,
    PermutationOutput,
    PermutationSpec,
    SparseMatrixSpec,
    StructureLayer,
    hookimpl,
)
from estimators.params import Range
from estimators.shared.neuralsort import sort_matrix
from estimators.shared.perturb import (
    Keys,
    MaskedMatrix,
    position_weights,
    sum_of_gamma_noise,
    topk_mask,
)
from estimators.shared.plackett_luce import all_orderings, perm_matrix
from estimators.shared.sinkhorn import gumbel_noise, hungarian

__all__ = ["NOISES", "ImleEstimator", "ImleMatrixLayer", "ImleSortLayer", "imle_sort", "imle_topk"]

NOISES: tuple[str, ...] = ("sum_of_gamma", "gumbel")


class ImleEstimator(Estimator):
    name: ClassVar[str] = "imle"
    description: ClassVar[str] = (
        "I-MLE (Niepert et al. 2021): perturb-and-MAP top-k / sort, target-distribution gradient"
    )
    kinds: ClassVar[frozenset[str]] = frozenset({"sparse_matrix", "permutation"})
    defaults: ClassVar[Mapping[str, Any]] = {
        "lambda": 10.0,  # target distribution step, theta' = theta - lambda dL/dz
        "tau": 1.0,  # noise temperature
        "samples": 1,  # perturb-and-MAP states per instance and step
        "noise": "sum_of_gamma",  # sparse_matrix only; permutation always draws Gumbel keys
        "scale_grad": False,  # divide the gradient by lambda
    }
    choices: ClassVar[Mapping[str, tuple[Any, ...]]] = {"noise": NOISES}
    positive: ClassVar[tuple[str, ...]] = ("lambda", "tau", "samples")
    space: ClassVar[Mapping[str, Any]] = {"lambda": Range(1.0, 1000.0, "log")}  # docs/protocols.md, Tuning

    def build_sparse_matrix(self, spec: SparseMatrixSpec, params: Mapping[str, Any]) -> StructureLayer:
        return ImleMatrixLayer(spec, **_layer_args(params), noise=params["noise"])

    def build_permutation(self, spec: PermutationSpec, params: Mapping[str, Any]) -> StructureLayer:
        return ImleSortLayer(spec, **_layer_args(params))


def _layer_args(params: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "lam": params["lambda"],
        "tau": params["tau"],
        "samples": params["samples"],
        "scale_grad": params["scale_grad"],
    }


class _Imle(torch.autograd.Function):
    """The I-MLE estimator around a MAP oracle, ``theta (b, d)`` -> mean MAP state ``(b, *event)``.

    ``cost(theta)`` lifts scores into the structure's space (the LP objective ``<y, cost>``),
    ``solve`` is the MAP of a lifted cost, ``lower`` maps a gradient in the structure's space back
    to the scores (the transpose of ``cost``'s linear map).
    """

    @staticmethod
    def forward(ctx, theta: Tensor, noise: Tensor, lam: float, scale: bool, oracle: _Oracle) -> Tensor:
        cost = oracle.cost(theta.detach() + noise)  # (M, b, *event)
        hard = oracle.solve(cost, forward=True)
        ctx.save_for_backward(cost, hard)
        ctx.lam, ctx.scale, ctx.oracle = lam, scale, oracle
        return hard.mean(0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None, None]:
        cost, hard = ctx.saved_tensors
        target = ctx.oracle.solve(cost - ctx.lam * grad, forward=False)
        diff = ctx.oracle.lower(hard - target).mean(0)  # (b, d)
        return (diff / ctx.lam if ctx.scale else diff), None, None, None, None


class _Oracle:
    """A MAP oracle in the form ``_Imle`` reads: ``cost``, ``solve`` and ``lower``."""

    def cost(self, theta: Tensor) -> Tensor:
        return theta

    def solve(self, cost: Tensor, forward: bool) -> Tensor:
        raise NotImplementedError

    def lower(self, grad: Tensor) -> Tensor:
        return grad


class _TopK(_Oracle):
    def __init__(self, k: int) -> None:
        self.k = k

    def solve(self, cost: Tensor, forward: bool) -> Tensor:
        return topk_mask(cost, self.k)


class _Sort(_Oracle):
    """Scores are keys ``(M, b, n)``; the lifted cost is ``w key^T`` ``(M, b, n, n)``."""

    def cost(self, theta: Tensor) -> Tensor:
        return position_weights(theta.shape[-1], theta)[:, None] * theta.unsqueeze(-2)

    def solve(self, cost: Tensor, forward: bool) -> Tensor:
        n = cost.shape[-1]
        if forward:  # rank-1 cost: the sort of the keys, its row of largest weight
            return sort_matrix(cost[..., -1, :].reshape(-1, n)).view(cost.shape)
        return hungarian(cost.reshape(-1, n, n)).view(cost.shape)

    def lower(self, grad: Tensor) -> Tensor:
        return (position_weights(grad.shape[-1], grad)[:, None] * grad).sum(-2)


def imle_topk(theta: Tensor, noise: Tensor, k: int, lam: float, scale_grad: bool = False) -> Tensor:
    """Mean of ``topk_mask(theta + noise_m, k)``, with the I-MLE gradient; ``noise (M, *theta.shape)``."""
    return _Imle.apply(theta, noise, lam, scale_grad, _TopK(k))


def imle_sort(keys: Tensor, noise: Tensor, lam: float, scale_grad: bool = False) -> Tensor:
    """Mean of ``sort_matrix(keys + noise_m)``, with the I-MLE gradient; ``(b, n)`` -> ``(b, n, n)``."""
    return _Imle.apply(keys, noise, lam, scale_grad, _Sort())


def _gumbel(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    return gumbel_noise(shape, generator=generator, device=like.device, dtype=like.dtype)


def _check(lam: float, tau: float, samples: int) -> None:
    for name, value in (("lambda", lam), ("tau", tau), ("samples", samples)):
        if value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")


class ImleMatrixLayer(StructureLayer):
    """``W = MAP(scores + tau eps) * values`` in training; ``eval()``: ``topk(scores) * values``."""

    def __init__(
        self,
        spec: SparseMatrixSpec,
        *,
        lam: float = 10.0,
        tau: float = 1.0,
        samples: int = 1,
        scale_grad: bool = False,
        noise: str = "sum_of_gamma",
    ) -> None:
        super().__init__()
        _check(lam, tau, samples)
        if noise not in NOISES:
            raise ValueError(f"noise must be one of {NOISES}, got {noise!r}")
        self.matrix = MaskedMatrix(spec)
        # perturb-and-MAP states inside one forward; not ``samples``, the contract's rows per instance
        self.lam, self.tau, self.noise_samples, self.scale_grad = lam, tau, samples, scale_grad
        self.noise = noise

    def forward(self, x: Tensor) -> Tensor:
        self.matrix.check(x)
        scores, k = self.matrix.scores, self.matrix.k
        if not self.training:
            return self.matrix.product(x, topk_mask(scores.detach(), k))
        theta = scores.expand(x.shape[0], -1)  # (b, entries): each instance its own draws
        shape = (self.noise_samples, *theta.shape)
        gumbel = self.noise == "gumbel"
        eps = _gumbel(shape, theta) if gumbel else sum_of_gamma_noise(shape, k, theta)
        mask = imle_topk(theta, self.tau * eps, k, self.lam, self.scale_grad)
        return self.matrix.product(x, mask)

    def snapshot(self) -> dict[str, Tensor]:
        return self.matrix.snapshot()


class ImleSortLayer(StructureLayer):
    """``sort_matrix(keys + tau G)`` (Gumbel ``G``) in training; ``eval()``: ``sort_matrix(keys)``."""

    def __init__(
        self, spec: PermutationSpec, *, lam: float = 10.0, tau: float = 1.0, samples: int = 1,
        scale_grad: bool = False,
    ) -> None:
        super().__init__()
        _check(lam, tau, samples)
        self.spec, self.keys = spec, Keys(spec)
        # perturb-and-MAP states inside one forward; not ``samples``, the contract's rows per instance
        self.lam, self.tau, self.noise_samples, self.scale_grad = lam, tau, samples, scale_grad

    def forward(self, inputs: Tensor | int, generator: torch.Generator | None = None) -> PermutationOutput:
        keys = self.keys(inputs)
        if not self.training:
            return PermutationOutput(steps=[sort_matrix(keys.detach())])
        eps = _gumbel((self.noise_samples, *keys.shape), keys, generator)
        return PermutationOutput(steps=[imle_sort(keys, self.tau * eps, self.lam, self.scale_grad)])

    def outcomes(self, *inputs: Tensor | int) -> Outcomes:
        """Every ordering of one instance's keys and its probability as a perturb-and-MAP state:
        the ascending sort of ``keys + tau G`` takes its *largest* item first with probability
        ``softmax(keys / tau)`` (the Gumbel-max trick), so its reversal is Plackett-Luce in
        ``keys / tau`` (``plackett_luce_log_prob`` of the keys ``-keys / tau``)."""
        keys = self.keys(inputs[0])  # (1, n): the task's keys, or the learned ones for batch size 1
        perms, log_probs = all_orderings(-keys / self.tau)  # perms: largest item first
        return Outcomes(perm_matrix(perms.flip(-1), keys.dtype), log_probs)

    def snapshot(self) -> dict[str, Tensor]:
        return {} if self.keys.free is None else {"keys": self.keys.free.detach().cpu()}


@hookimpl
def register_estimators(register: Callable[[Estimator], None]) -> None:
    register(ImleEstimator())
