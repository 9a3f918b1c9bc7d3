"""What the perturb-and-MAP estimators (``perturbed``, ``imle``) share: noise, the two MAP oracles,
and the plumbing of their ``sparse_matrix`` and ``permutation`` layers.

Both estimators put noise on a score vector ``theta`` and solve a linear program over the
structures ``y`` exactly (the *MAP oracle*): ``argmax_y <y, theta + noise>``.

- ``sparse_matrix``: one score per entry of ``W`` (``prod(out_shape) * prod(in_shape)`` scores); the
  oracle is the top-``k`` mask (the ``k``-subset polytope, ``k = spec.k``), ``topk_mask``. ``W``
  is that mask times a free value per entry (``MaskedMatrix``).
- ``permutation``: one key per item; the oracle is the ascending sort matrix, the assignment
  problem ``argmax_P <P, w s^T>`` with increasing position weights ``w`` (``position_weights``)
  and rank-1 cost. ``source="free"`` learns the ``n`` keys themselves (``Keys``).

Every instance of a batch draws its own noise (free structures included), ``samples`` draws each.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from estimators.base import PermutationSpec, SparseMatrixSpec
from estimators.shared.permutation import check_keys
from estimators.sparse import weight_shape

__all__ = [
    "Keys",
    "MaskedMatrix",
    "position_weights",
    "sum_of_gamma_noise",
    "topk_mask",
]


def topk_mask(scores: Tensor, k: int) -> Tensor:
    """The MAP state of the ``k``-subset polytope: 1 at the ``k`` largest of the last axis, else 0."""
    index = scores.topk(k, dim=-1).indices
    return torch.zeros_like(scores).scatter_(-1, index, 1.0)


def position_weights(n: int, like: Tensor) -> Tensor:
    """``w = (1, ..., n)``: ``argmax_P <P, w s^T>`` puts the ``i``-th smallest key at position ``i``."""
    return torch.arange(1, n + 1, device=like.device, dtype=like.dtype)


def sum_of_gamma_noise(shape: tuple[int, ...], k: int, like: Tensor, iterations: int = 10) -> Tensor:
    """Sum-of-Gamma noise (Niepert et al. 2021, §3.2 / Thm. 1), ``tau = 1``.

    ``(1/k) (sum_{i=1}^{s} Gamma(1/k, scale=k/i) - log s)``: the sum of ``k`` independent draws is
    Gumbel (as ``s -> inf``), so perturb-and-MAP of a ``k``-subset spreads Gumbel noise over its
    ``k`` members. ``s = iterations`` (10, the authors' ``torch-imle`` default).
    """
    concentration = torch.full((iterations,), 1.0 / k, device=like.device, dtype=like.dtype)
    rate = torch.arange(1, iterations + 1, device=like.device, dtype=like.dtype) / k  # scale k / i
    gammas = torch.distributions.Gamma(concentration, rate).sample(shape)  # (*shape, s)
    return (gammas.sum(-1) - math.log(iterations)) / k


class MaskedMatrix(nn.Module):
    """``W = mask * values`` for a ``SparseMatrixSpec``: one score and one free value per entry.

    Scores start near 0 (``0.01 N(0, 1)`` breaks ties) so the noise decides the first masks;
    values start at 1, as the sparse and REINFORCE layers' fixed values.
    """

    def __init__(self, spec: SparseMatrixSpec) -> None:
        super().__init__()
        self.in_shape, self.out_shape = tuple(spec.in_shape), tuple(spec.out_shape)
        weight_shape(self.in_shape, self.out_shape)  # validates the spec
        self.rows, self.cols = math.prod(self.out_shape), math.prod(self.in_shape)
        if not 1 <= spec.k <= self.rows * self.cols:
            raise ValueError(f"spec.k must be in [1, {self.rows * self.cols}], got {spec.k}")
        self.k = spec.k
        self.scores = nn.Parameter(0.01 * torch.randn(self.rows * self.cols))
        self.values = nn.Parameter(torch.ones(self.rows * self.cols))

    def product(self, x: Tensor, mask: Tensor) -> Tensor:
        """``W x`` per instance: ``x (b, *in_shape)``, ``mask (rows*cols,)`` or ``(b, rows*cols)``."""
        b = x.shape[0]
        weight = (mask * self.values).reshape(-1, self.rows, self.cols)  # (1 or b, rows, cols)
        out = (weight @ x.reshape(b, self.cols, 1)).squeeze(-1)  # (b, rows)
        return out.view(b, *self.out_shape)

    def check(self, x: Tensor) -> None:
        if tuple(x.shape[1:]) != self.in_shape:
            raise ValueError(f"expected x of shape (b, *{self.in_shape}), got {tuple(x.shape)}")

    def snapshot(self) -> dict[str, Tensor]:
        """Scores, values and the eval mask, each ``out_shape + in_shape``."""
        shape = (*self.out_shape, *self.in_shape)
        return {
            "scores": self.scores.detach().reshape(shape).cpu(),
            "values": self.values.detach().reshape(shape).cpu(),
            "mask": topk_mask(self.scores.detach(), self.k).reshape(shape).cpu(),
        }


class Keys(nn.Module):
    """The keys a permutation layer sorts: the task's (``source="keys"``) or ``n`` learned ones.

    ``source="free"`` learns one key per item (``0.01 N(0, 1)``, ties broken) and repeats them for
    every instance of ``forward(batch_size)``; each instance still draws its own noise.
    """

    def __init__(self, spec: PermutationSpec) -> None:
        super().__init__()
        self.spec = spec
        self.free = nn.Parameter(0.01 * torch.randn(spec.n)) if spec.source == "free" else None

    def forward(self, inputs: Tensor | int) -> Tensor:
        """``(b, n)`` keys from ``forward``'s argument, checked against the spec's source."""
        if self.free is None:
            if not isinstance(inputs, Tensor):
                raise TypeError(f"source='keys' takes keys of shape (batch, {self.spec.n}), got {inputs!r}")
            check_keys(inputs, self.spec.n)
            return inputs
        if isinstance(inputs, Tensor) or inputs < 1:
            raise TypeError(f"source='free' takes a batch size >= 1, got {inputs!r}")
        return self.free.expand(inputs, -1)
