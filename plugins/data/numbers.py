"""Multi-digit numbers to sort (paper §3.3), and a tie-aware way to score a sort.

An instance is ``n`` numbers drawn uniformly from 0 .. 10**d - 1, independently, so equal numbers
within an instance are allowed (with d = 1 and n > 10 they are certain). Each number is shown as
``d`` MNIST digit images of its decimal digits, most significant first: position 0 is the
10**(d-1) place and position d-1 the units (least significant) digit; leading zeros are shown as
images of 0. Each image is drawn uniformly from the pool's digits of that label, so call with
``splits.train`` for training and ``splits.test`` for evaluation.

Ties: the target order is the *stable* sort of the values (equal numbers keep their input order,
``target_permutation``), which is what a loss needs. Scoring is tie-aware: ``sorting_correct``
counts an instance correct iff the values read in the order of the keys never decrease, so any
order among equal numbers is right; position i of the key order is correct iff it holds a number
equal to the i-th smallest. Without ties this is the paper's "exact argsort match" and
NeuralSort's per-element accuracy.

Protocols: the paper sorts n = 4, 8, 16 three-digit numbers (``PAPER_PROTOCOL``); NeuralSort
(Grover et al. 2019) sorts n = 3, 5, 7, 9, 15 four-digit numbers (``NEURALSORT_PROTOCOL``) and
tunes on a validation split of the training digits (``validation_split``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from plugins.data.mnist import DataConfigError, DataError, DigitSet

__all__ = [
    "NEURALSORT_PROTOCOL",
    "PAPER_PROTOCOL",
    "VALIDATION_EVERY",
    "SortingProtocol",
    "order_correct",
    "order_strict",
    "sorting_correct",
    "sorting_indices",
    "sorting_instances",
    "target_permutation",
    "validation_split",
]

_MAX_DIGITS = 18  # 10**18 - 1 still fits in int64


@dataclass(frozen=True)
class SortingProtocol:
    """An evaluation protocol: how many digits per number and which instance sizes n."""

    name: str
    digits_per_number: int
    sizes: tuple[int, ...]


PAPER_PROTOCOL = SortingProtocol("bloem2018", digits_per_number=3, sizes=(4, 8, 16))
NEURALSORT_PROTOCOL = SortingProtocol("neuralsort", digits_per_number=4, sizes=(3, 5, 7, 9, 15))
VALIDATION_EVERY = 6  # every 6th training digit is held out: 50k / 10k of MNIST's 60k


def sorting_indices(
    digits: DigitSet, count: int, n: int, digits_per_number: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices into ``digits`` (count, n, d) and the numbers they show (count, n) int64.

    The memory-light form of ``sorting_instances``: 10,000 instances of 16 three-digit numbers
    are 1.5 GB as float images but 4 MB as indices.
    """
    for name, value in (("count", count), ("n", n), ("digits_per_number", digits_per_number)):
        if value < 1:
            raise DataConfigError(f"sorting instances {name}={value!r}: must be >= 1")
    if digits_per_number > _MAX_DIGITS:
        raise DataConfigError(
            f"sorting instances digits_per_number={digits_per_number!r}: at most {_MAX_DIGITS}"
        )
    g = torch.Generator().manual_seed(seed)
    d = digits_per_number
    values = torch.randint(0, 10**d, (count, n), generator=g)  # (count, n)
    place = 10 ** torch.arange(d - 1, -1, -1)  # (d,) most significant first
    labels = values[..., None] // place % 10  # (count, n, d)

    pool_labels = digits.labels.cpu()
    order = torch.argsort(pool_labels, stable=True)  # pool indices grouped by class
    per_class = torch.bincount(pool_labels, minlength=10)  # (10,)
    missing = [c for c in range(10) if per_class[c] == 0]
    if missing:
        raise DataError(
            f"the digit pool has no images of label(s) {missing}; sorting needs all ten digits"
        )
    start = torch.cumsum(per_class, 0) - per_class  # (10,) first position of each class
    within = (torch.rand(labels.shape, generator=g) * per_class[labels]).long()  # (count, n, d)
    return order[start[labels] + within], values


def sorting_instances(
    digits: DigitSet, count: int, n: int, digits_per_number: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (count, n, d, 28, 28) float32 of n numbers per instance, and values (count, n)."""
    index, values = sorting_indices(digits, count, n, digits_per_number, seed)
    return digits.images[index.to(digits.images.device)], values


def target_permutation(values: torch.Tensor) -> torch.Tensor:
    """(..., n) indices that sort ``values`` ascending; equal values keep their input order."""
    return torch.argsort(values, dim=-1, stable=True)


def sorting_correct(keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Score predicted keys (count, n) against true values (count, n), ascending, tie-aware.

    Returns ``all_correct`` (count,) bool: the values in key order never decrease; and
    ``per_element_correct`` (count, n) bool: position i of the key order holds a value equal to
    the i-th smallest. Equal keys are taken in input order (a stable sort).
    """
    if keys.shape != values.shape or keys.dim() != 2:
        raise ValueError(
            f"keys {tuple(keys.shape)} and values {tuple(values.shape)} must both be (count, n)"
        )
    return order_correct(torch.argsort(keys, dim=-1, stable=True), values)


def order_correct(order: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``sorting_correct`` for a predicted order: ``order[c, i]`` is the item put at position i.

    For estimators that output a permutation rather than keys (Gumbel-Sinkhorn's Hungarian
    matching). Returns ``all_correct`` (count,) and ``per_element_correct`` (count, n), bool.
    """
    if order.shape != values.shape or order.dim() != 2:
        raise ValueError(
            f"order {tuple(order.shape)} and values {tuple(values.shape)} must both be (count, n)"
        )
    by_order = values.gather(-1, order)  # (count, n)
    per_element = by_order == values.sort(dim=-1).values  # (count, n)
    return per_element.all(dim=-1), per_element


def order_strict(order: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``(count,)`` bool: the predicted order is *the* sort of ``values`` ``(count, n)``, ties in
    input order, as the authors' error compares indices (sparse-hyper ``multisort.experiment.py``
    at 9664193: ``torch.sort(l)`` against ``torch.sort(keys)``): an instance with tied numbers
    counts as correct only if they come in that one order, where ``order_correct`` takes any."""
    if order.shape != values.shape or order.dim() != 2:
        raise ValueError(
            f"order {tuple(order.shape)} and values {tuple(values.shape)} must both be (count, n)"
        )
    return (order == target_permutation(values)).all(dim=-1)


def validation_split(digits: DigitSet, every: int = VALIDATION_EVERY) -> tuple[DigitSet, DigitSet]:
    """Hold out every ``every``-th digit of a training pool: (train, validation), disjoint.

    NeuralSort's protocol tunes on a validation split of the MNIST training digits (Grover et al.
    2019, appendix D: 50,000 / 10,000 / 10,000). Every 6th of the 60,000 training digits is
    exactly 10,000; taking every k-th (not the last 10,000) keeps the classes balanced in pools
    stored grouped by class, such as the embedded digits.
    """
    if every < 2:
        raise DataConfigError(f"validation split every={every!r}: must be >= 2")
    held = (torch.arange(len(digits)) % every == every - 1).to(digits.labels.device)  # (N,)
    train = DigitSet(digits.images[~held], digits.labels[~held])
    return train, DigitSet(digits.images[held], digits.labels[held])
