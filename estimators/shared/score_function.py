"""Baselines for score-function estimators that draw several samples of every instance.

Losses arrive in the contract's sample-major layout (``estimators.base.StructureLayer``): a flat
``(S * b,)`` tensor whose entry ``s * b + i`` is sample ``s`` of instance ``i``.
"""

from __future__ import annotations

import torch

__all__ = ["leave_one_out"]


def leave_one_out(loss: torch.Tensor, samples: int) -> torch.Tensor:
    """Each sample's baseline: the mean loss of the *other* ``samples - 1`` samples of its instance.

    Kool et al. (2019), "Buy 4 REINFORCE samples, get a baseline for free!": the baseline of
    sample ``s`` is independent of sample ``s`` itself, so ``(L_s - b_s) grad log p_s`` stays an
    unbiased gradient estimate while the other samples cancel most of its variance. ``(S * b,)``
    -> ``(S * b,)``, detached.
    """
    if samples < 2:
        raise ValueError(f"a leave-one-out baseline needs samples >= 2, got {samples}")
    if loss.dim() != 1 or loss.shape[0] % samples:
        raise ValueError(
            f"losses must be flat (S * b,) with S = {samples}, got shape {tuple(loss.shape)}"
        )
    grouped = loss.detach().view(samples, -1)  # (S, b)
    return ((grouped.sum(0, keepdim=True) - grouped) / (samples - 1)).reshape(-1)
