"""Plackett-Luce distribution over orderings of keys, for score-function (REINFORCE) training.

The ordering is built from the smallest position up: position 1 takes item ``j`` with probability
``softmax(-keys)_j``, position 2 chooses among the rest the same way, and so on. The mode is the
ascending sort, matching ``x_sorted = P @ x``. Sampling is the Gumbel trick: sorting
``keys - G`` ascending (``-keys + G`` descending) draws exactly this distribution.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from estimators.base import MAX_OUTCOMES

__all__ = ["all_orderings", "perm_matrix", "plackett_luce_log_prob", "plackett_luce_sample"]


def plackett_luce_sample(
    keys: torch.Tensor, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One ordering per instance; ``(b, n)`` keys -> ``(b, n)`` long, item at each position."""
    u = torch.rand(keys.shape, generator=generator, device=keys.device, dtype=keys.dtype)
    u = u.clamp(torch.finfo(keys.dtype).tiny, 1.0 - torch.finfo(keys.dtype).eps)
    gumbel = -torch.log(-torch.log(u))
    return (keys.detach() - gumbel).argsort(dim=-1)


def plackett_luce_log_prob(keys: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``log p(perm | keys)``, differentiable in ``keys``; ``(b, n)``, ``(b, n)`` -> ``(b,)``.

    ``sum_i [s_perm(i) - logsumexp_{m >= i} s_perm(m)]`` with scores ``s = -keys``.
    """
    scores = -keys.gather(-1, perm)  # (b, n) in the order chosen
    tails = scores.flip(-1).logcumsumexp(-1).flip(-1)  # (b, n): logsumexp over positions >= i
    return (scores - tails).sum(-1)


def perm_matrix(perm: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``P[b, i, perm[b, i]] = 1``: the matrix that puts item ``perm[i]`` at position ``i``."""
    return F.one_hot(perm, perm.shape[-1]).to(dtype)


def all_orderings(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ordering of one instance's keys ``(1, n)`` and its Plackett-Luce log-probability:
    ``(n!, n)`` long, ``(n!,)`` differentiable in ``keys``; for the layers' ``outcomes``.

    ``ValueError`` beyond ``MAX_OUTCOMES``."""
    n = keys.shape[-1]
    if math.factorial(n) > MAX_OUTCOMES:
        raise ValueError(f"{n}! orderings is too many to list (at most {MAX_OUTCOMES})")
    perms = torch.tensor(list(itertools.permutations(range(n))), device=keys.device)  # (n!, n)
    return perms, plackett_luce_log_prob(keys.reshape(1, n).expand(len(perms), n), perms)
