"""NeuralSort: a deterministic relaxation of the sort matrix (Grover et al. 2019).

Grover et al. define the *descending* relaxation, row ``i`` (1-based) of
``P_hat = softmax(((n + 1 - 2i) s - A_s 1) / tau)`` with ``A_s[j, k] = |s_j - s_k|``. We use the
ascending convention ``x_sorted = P @ x``: ascending row ``i`` is descending row ``n + 1 - i``,
i.e. the coefficient becomes ``(2i - n - 1)``. Each row is a softmax, so rows sum to 1 (the columns
only in the limit ``tau -> 0``, where ``P_hat`` becomes the sort matrix).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["neuralsort", "neuralsort_logits", "sort_matrix"]


def neuralsort_logits(keys: torch.Tensor) -> torch.Tensor:
    """Logits ``(2i - n - 1) key_j - sum_k |key_j - key_k|`` of ascending row ``i`` (1-based).

    Row ``i``'s maximum sits on the ``i``-th smallest key (Grover et al. 2019, Theorem 1).
    ``(b, n)`` -> ``(b, n, n)``.
    """
    n = keys.shape[-1]
    spread = (keys[:, :, None] - keys[:, None, :]).abs().sum(-1)  # (b, n): (A_s 1)_j
    coef = 2 * torch.arange(1, n + 1, device=keys.device, dtype=keys.dtype) - n - 1  # (n,)
    return coef[:, None] * keys[:, None, :] - spread[:, None, :]  # (b, n, n)


def neuralsort(keys: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """The ascending NeuralSort relaxation; ``(b, n)`` keys -> ``(b, n, n)`` row-stochastic."""
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    return (neuralsort_logits(keys) / tau).softmax(dim=-1)


def sort_matrix(keys: torch.Tensor) -> torch.Tensor:
    """The hard ascending sort matrix, ties kept in input order; ``(b, n)`` -> ``(b, n, n)``."""
    order = keys.argsort(dim=-1, stable=True)  # (b, n): item at each output position
    return F.one_hot(order, keys.shape[-1]).to(keys.dtype)
