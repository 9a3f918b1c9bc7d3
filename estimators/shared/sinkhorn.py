"""Gumbel-Sinkhorn relaxation of permutations and the Hungarian hard limit (Mena et al. 2018).

The functions are layout-agnostic: Sinkhorn normalises rows first, then columns, of whatever
``(b, n, n)`` matrix it is given. ``GumbelSinkhornLayer`` feeds it Mena et al.'s item-major scores
(row ``j``: item ``j``'s score for every position) and transposes the result into this package's
``x_sorted = P @ x`` (rows = positions).

Defaults follow the reference implementation (google/gumbel_sinkhorn, ``sinkhorn_ops.py``):
``gumbel_sinkhorn(temp=1.0, noise_factor=1.0, n_iters=20)``; its sorting experiment uses the same
temperature and noise with 10 iterations, and its docstring notes that about 20 iterations give
decent convergence for n ~ 100, so 20 is ample for the n <= 16 used here.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["gumbel_noise", "gumbel_sinkhorn", "hungarian", "log_sinkhorn"]


def gumbel_noise(
    shape: tuple[int, ...],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard Gumbel samples ``-log(-log U)``; ``U`` stays off 0 and 1 so both logs are finite."""
    tiny = torch.finfo(dtype).tiny
    u = torch.rand(shape, generator=generator, device=device, dtype=dtype)
    return -torch.log(-torch.log(u.clamp(tiny, 1.0 - torch.finfo(dtype).eps)))


def log_sinkhorn(log_alpha: torch.Tensor, iterations: int = 20) -> torch.Tensor:
    """Alternating row and column normalisation in log space; ``(b, n, n)`` -> log of ``P``.

    Rows first, as in the reference (``sinkhorn_ops.py``). The returned columns sum to 1 exactly,
    the rows up to the remaining Sinkhorn error.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    for _ in range(iterations):
        log_alpha = log_alpha - log_alpha.logsumexp(dim=-1, keepdim=True)  # rows
        log_alpha = log_alpha - log_alpha.logsumexp(dim=-2, keepdim=True)  # columns
    return log_alpha


def gumbel_sinkhorn(
    log_alpha: torch.Tensor,
    *,
    temperature: float = 1.0,
    iterations: int = 20,
    noise: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``sinkhorn((log_alpha + noise * G) / temperature)``: ``(b, n, n)`` -> doubly stochastic.

    With ``noise=0`` the map is deterministic; as ``temperature -> 0`` it tends to the Hungarian
    solution of ``log_alpha + noise * G``, a sample of a permutation.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if noise:
        g = gumbel_noise(
            tuple(log_alpha.shape),
            generator=generator,
            device=log_alpha.device,
            dtype=log_alpha.dtype,
        )
        log_alpha = log_alpha + noise * g
    return log_sinkhorn(log_alpha / temperature, iterations).exp()


def hungarian(scores: torch.Tensor) -> torch.Tensor:
    """The permutation matrix maximising ``sum_ij P_ij scores_ij`` per instance (SciPy, CPU).

    ``(b, n, n)`` -> ``(b, n, n)`` hard permutations with ``scores``' dtype and device, no gradient.
    """
    if scores.dim() != 3 or scores.shape[-1] != scores.shape[-2]:
        raise ValueError(f"hungarian needs (batch, n, n) scores, got shape {tuple(scores.shape)}")
    # imported here: scipy.optimize takes about a second, and only evaluation needs it, while
    # every command loads this module with the gumbel_sinkhorn plugin
    from scipy.optimize import linear_sum_assignment

    mats = scores.detach().cpu().double().numpy()
    cols = np.stack([linear_sum_assignment(m, maximize=True)[1] for m in mats])  # (b, n)
    perm = torch.as_tensor(cols, device=scores.device)  # P[b, i, perm[b, i]] = 1
    return F.one_hot(perm, scores.shape[-1]).to(scores.dtype)
