"""What the built-in ``permutation`` layers share: their conventions and argument checks.

Every layer returns a ``PermutationOutput`` with ``x_sorted = output.matrix @ x`` (ascending
order). In ``eval()`` mode every layer returns hard permutation matrices. The functional maths
lives in ``estimators.sparse.quicksort``, ``estimators.shared.sinkhorn``,
``estimators.shared.neuralsort`` and ``estimators.shared.plackett_luce``; the layers
(``QuicksortLayer`` in ``estimators.plugins.sparse``, ``GumbelSinkhornLayer`` in
``estimators.plugins.gumbel_sinkhorn``, ``NeuralSortLayer`` in ``estimators.plugins.dense``,
``PlackettLuceLayer`` in ``estimators.plugins.reinforce``) only validate, pick train or eval
behaviour and keep state (learned logits, the REINFORCE baseline). Layers that draw noise take an
optional ``generator`` in ``forward`` so that tests can fix the sample.

Each layer class offers ``unsupported(spec)``: the reason it cannot serve a spec, or ``None``; an
estimator's own ``unsupported`` can return it, and the constructor raises ``ValueError`` with it.
"""

from __future__ import annotations

import torch

from estimators.base import PermutationSpec

__all__ = ["check_keys", "check_positive", "keys_only"]


def keys_only(spec: PermutationSpec, name: str) -> str | None:
    """The reason a layer that sorts keys cannot serve ``spec``, or ``None``."""
    if spec.source != "keys":
        return f"{name} sorts by keys; it has no free (source={spec.source!r}) permutation"
    return None


def check_keys(keys: torch.Tensor, n: int) -> None:
    """``ValueError`` unless ``keys`` is ``(batch, n)``."""
    if keys.dim() != 2 or keys.shape[1] != n:
        raise ValueError(f"keys must have shape (batch, {n}), got {tuple(keys.shape)}")


def check_positive(name: str, value: float) -> None:
    """``ValueError`` naming the argument unless ``value > 0``."""
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
