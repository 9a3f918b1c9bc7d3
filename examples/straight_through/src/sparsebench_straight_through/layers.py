"""The two layers of the straight-through estimator; plain torch, no sparsebench internals."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from estimators.base import PermutationOutput, PermutationSpec, SparseMatrixSpec, StructureLayer

__all__ = ["StraightThroughMatrix", "StraightThroughSort", "neuralsort", "sort_matrix"]


def _gumbel(shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
    return -torch.empty(shape, device=like.device, dtype=like.dtype).exponential_().log()


def _straight_through(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """The value of ``hard`` with the gradient of ``soft``."""
    return hard + (soft - soft.detach())


class StraightThroughMatrix(StructureLayer):
    """``W x`` with one nonzero (value 1) per output row: the input it reads, a categorical sample
    over ``logits`` (``(outputs, inputs)``), drawn per instance."""

    def __init__(self, spec: SparseMatrixSpec, tau: float = 1.0, noise: float = 1.0) -> None:
        super().__init__()
        self.in_shape, self.out_shape = tuple(spec.in_shape), tuple(spec.out_shape)
        self.tau, self.noise = tau, noise
        # small random logits: every output starts undecided, but not all alike
        self.logits = nn.Parameter(0.01 * torch.randn(math.prod(self.out_shape), math.prod(self.in_shape)))

    def weight(self, batch: int) -> torch.Tensor:
        """``(b, outputs, inputs)``: sampled one-hot rows in training, the argmax in ``eval()``."""
        logits = self.logits.expand(batch, -1, -1)
        if not self.training:
            return F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
        soft = ((logits + self.noise * _gumbel(logits.shape, logits)) / self.tau).softmax(-1)
        hard = F.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
        return _straight_through(hard, soft)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        y = self.weight(b) @ x.reshape(b, -1, 1)  # (b, outputs, 1)
        return y.view(b, *self.out_shape)

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {"logits": self.logits.detach().cpu()}


def sort_matrix(keys: torch.Tensor) -> torch.Tensor:
    """``(b, n)`` keys -> ``(b, n, n)`` hard permutations sorting them ascending (ties stable)."""
    order = keys.argsort(dim=-1, stable=True)  # input index at every sorted position
    return F.one_hot(order, keys.shape[-1]).to(keys.dtype)


def neuralsort(keys: torch.Tensor, tau: float) -> torch.Tensor:
    """NeuralSort's relaxation of ``sort_matrix`` (Grover et al. 2019, eq. 5, for ascending order):
    row ``i`` is ``softmax(((n + 1 - 2i) (-s) - A 1) / tau)`` with ``A_jk = |s_j - s_k|``."""
    n = keys.shape[-1]
    spread = (keys[:, :, None] - keys[:, None, :]).abs().sum(-1)  # (b, n): A 1
    scale = n + 1 - 2 * torch.arange(1, n + 1, device=keys.device, dtype=keys.dtype)  # (n,)
    scores = scale[None, :, None] * (-keys)[:, None, :] - spread[:, None, :]  # (b, n, n)
    return (scores / tau).softmax(-1)


class StraightThroughSort(StructureLayer):
    """Sorts Gumbel-perturbed scores: the keys (``source="keys"``) or learned per-item scores
    (``source="free"``, one permutation per instance). Hard sort forward, NeuralSort backward."""

    def __init__(self, spec: PermutationSpec, tau: float = 1.0, noise: float = 1.0) -> None:
        super().__init__()
        self.spec, self.tau, self.noise = spec, tau, noise
        self.scores = nn.Parameter(0.01 * torch.randn(spec.n)) if spec.source == "free" else None

    def forward(self, inputs: torch.Tensor | int) -> PermutationOutput:
        if self.scores is None:
            if not isinstance(inputs, torch.Tensor) or inputs.shape[-1] != self.spec.n:
                raise ValueError(f"expected keys of shape (batch, {self.spec.n}), got {inputs!r}")
            keys = inputs
        else:
            keys = self.scores.expand(int(inputs), -1)
        if not self.training:
            return PermutationOutput(steps=[sort_matrix(keys.detach())])
        perturbed = keys + self.noise * _gumbel(keys.shape, keys)
        soft = neuralsort(perturbed, self.tau)
        return PermutationOutput(steps=[_straight_through(sort_matrix(perturbed.detach()), soft)])
