"""Differentiable quicksort from sampled half-permutations (Bloem et al. 2018, section 3.3).

Convention: ``x_sorted = P @ x`` sorts ascending and every matrix is ``(b, n, n)`` with
``P[b, row, col] = 1`` meaning "input ``col`` goes to output ``row``".

Step ``d`` (``d = 1 .. log2 n``) splits every chunk of ``c = n 2^-(d-1)`` consecutive positions
into a lower half (keys below the chunk median, ``o = 0``) and an upper half (``o = 1``), keeping
the order within each half: the ``d``-th order half-permutation ``P^d(o)``. Composing the
``log2 n`` steps with median pivots sorts the keys; the keys travel through the same matrices, so
step ``d`` looks at ``x_{d-1} = P^{d-1} ... P^1 x_0``.

Training (the paper's sparse layer): each step mixes the half-permutations of ``a`` random valid
vectors ``o`` plus the rounded one, weighted by ``p(o) = prod_i o'_i^{o_i} (1 - o'_i)^{1 - o_i}``
with ``o' = sigmoid(C (x - median(chunk)))``. Every sampled ``o`` puts exactly one entry in every
column, so the paper's column normalisation is a softmax of ``log p`` over the unique samples and
each step is a convex mixture of permutation matrices (doubly stochastic). The matrices are built
densely with ``scatter_add`` (``n`` is 16 at most in the paper; a dense ``(b, n, n)`` step is
cheaper than sparse bookkeeping at that size).

Ties: the median of a chunk is the mean of its two middle keys (as in the original code), and the
hard vector is ``o = 1`` for the upper half of the *ranks* within the chunk, ranks broken by
current position. Every chunk therefore gets exactly half ones even when keys tie at the median,
and the hard sort is stable (tied keys keep their input order). In the soft weights a key equal
to the median has ``o' = 0.5``.

Outputs of ``P @ x`` are convex combinations of ``x``, but may leave ``(0, 1)`` by rounding; the
task clamps them before a binary cross-entropy (paper footnote 8).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "QuicksortSteps",
    "chunk_medians",
    "duplicate_vector_mask",
    "half_permutation_matrix",
    "half_permutation_rows",
    "hard_half_vector",
    "identity_half_vector",
    "intermediate_inputs",
    "intermediate_targets",
    "num_steps",
    "quicksort",
    "sample_half_vectors",
    "soft_half_permutation",
]


class QuicksortSteps(NamedTuple):
    """The half-permutations in order of application and the keys as they travel through them."""

    steps: list[torch.Tensor]  # log2 n tensors (b, n, n)
    keys: torch.Tensor  # (b, log2 n + 1, n): x_0 (the input keys) .. x_{log2 n} (sorted)


def num_steps(n: int) -> int:
    """``log2 n``, the number of half-permutations (median pivots need ``n`` a power of 2)."""
    if n < 2 or n & (n - 1):
        raise ValueError(f"quicksort needs n to be a power of two >= 2, got n={n}")
    return n.bit_length() - 1


def _chunk(n: int, order: int) -> int:
    """Chunk size ``n 2^-(order-1)`` of a half-permutation of the given order."""
    if not 1 <= order <= num_steps(n):
        raise ValueError(f"order must lie in 1..{num_steps(n)} for n={n}, got order={order}")
    return n >> (order - 1)


def identity_half_vector(n: int, order: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The ``o`` of order ``order`` whose half-permutation is the identity; ``(n,)`` bool."""
    c = _chunk(n, order)
    within = torch.arange(c, device=device) >= c // 2  # (c,): lower half 0, upper half 1
    return within.repeat(n // c)


def half_permutation_rows(o: torch.Tensor, order: int) -> torch.Tensor:
    """Algorithm 2: the output row ``r(o)_i`` of every input ``i``; ``(..., n)`` bool -> long.

    Within each chunk the zeros fill the lower half and the ones the upper half, each in input
    order (a cumulative sum that restarts at every chunk).
    """
    n = o.shape[-1]
    c = _chunk(n, order)
    ones = o.long().unflatten(-1, (n // c, c))  # (..., n/c, c)
    upper = ones.cumsum(-1) - 1 + c // 2  # rank among the ones, offset into the upper half
    lower = (1 - ones).cumsum(-1) - 1  # rank among the zeros
    start = torch.arange(0, n, c, device=o.device).unsqueeze(-1)  # (n/c, 1)
    rows = torch.where(ones.bool(), upper, lower) + start  # (..., n/c, c)
    return rows.flatten(-2)


def half_permutation_matrix(
    o: torch.Tensor, order: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The permutation matrix ``P^order(o)`` of a valid ``o``; ``(..., n)`` -> ``(.., n, n)``."""
    rows = half_permutation_rows(o, order)  # (..., n)
    return F.one_hot(rows, o.shape[-1]).to(dtype).transpose(-1, -2)  # P[.., r_i, i] = 1


def chunk_medians(keys: torch.Tensor, order: int) -> torch.Tensor:
    """Median of every chunk (mean of its two middle keys), broadcast; ``(b, n)`` -> ``(b, n)``.

    The mean of the middle pair puts exactly half of a chunk's distinct keys above the pivot.
    """
    b, n = keys.shape
    c = _chunk(n, order)
    ordered = keys.view(b, n // c, c).sort(dim=-1).values  # (b, n/c, c)
    median = ordered[..., c // 2 - 1 : c // 2 + 1].mean(-1, keepdim=True)  # (b, n/c, 1)
    return median.expand(b, n // c, c).reshape(b, n)


def hard_half_vector(keys: torch.Tensor, order: int) -> torch.Tensor:
    """``o = 1`` for the upper half of ranks per chunk, ties broken by position; ``(b, n)`` bool.

    Equals ``round(o')`` whenever no key sits on its chunk's median.
    """
    b, n = keys.shape
    c = _chunk(n, order)
    by_value = keys.view(b, n // c, c).argsort(dim=-1, stable=True)  # (b, n/c, c)
    ranks = by_value.argsort(dim=-1)  # rank of every position within its chunk
    return (ranks >= c // 2).view(b, n)


def sample_half_vectors(
    batch: int,
    n: int,
    order: int,
    samples: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Uniformly random valid ``o`` of the given order: the identity vector shuffled per chunk.

    ``argsort`` of uniform noise is a uniform random permutation of each chunk's positions, and
    the identity vector holds a one exactly where that position lies in the upper half.
    Returns ``(batch, samples, n)`` bool.
    """
    c = _chunk(n, order)
    noise = torch.rand(batch, samples, n // c, c, generator=generator, device=device)
    shuffled = noise.argsort(dim=-1)  # (batch, samples, n/c, c) random permutation per chunk
    return (shuffled >= c // 2).flatten(-2)


def duplicate_vector_mask(o: torch.Tensor) -> torch.Tensor:
    """Marks all repeats of a vector in a sample set but the first; ``(b, S, n)`` -> ``(b, S)``.

    ``r(o)`` is a bijection of valid ``o``, so equal vectors are exactly equal index sequences.
    Each vector is packed into 62-bit integer words (exact, no hashing) and the sample set is
    sorted lexicographically by those words; a vector equal to its sorted predecessor is a
    duplicate.
    """
    b, s, n = o.shape
    words = -(-n // 62)
    bits = F.pad(o.long(), (0, words * 62 - n)).view(b, s, words, 62)  # (b, S, W, 62)
    weights = 2 ** torch.arange(62, device=o.device)  # (62,)
    packed = (bits * weights).sum(-1)  # (b, S, W) int64, exact
    idx = torch.arange(s, device=o.device).expand(b, s)  # (b, S)
    for w in reversed(range(words)):  # stable sorts from the last word: lexicographic order
        key = packed[..., w].gather(1, idx)
        idx = idx.gather(1, key.argsort(dim=1, stable=True))
    ordered = packed.gather(1, idx.unsqueeze(-1).expand(b, s, words))  # (b, S, W)
    repeat = (ordered[:, 1:] == ordered[:, :-1]).all(-1)  # (b, S-1)
    repeat = torch.cat([repeat.new_zeros(b, 1), repeat], dim=1)  # (b, S), sorted order
    return torch.zeros_like(repeat).scatter(1, idx, repeat)


def soft_half_permutation(
    keys: torch.Tensor,
    order: int,
    *,
    C: float = 10.0,
    samples: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The paper's sparse half-permutation layer of one step; ``(b, n)`` keys -> ``(b, n, n)``.

    A mixture over ``samples`` random valid vectors plus the hard one, weighted by ``p(o)``
    (log space, duplicates zeroed), normalised so that every column sums to 1.
    """
    b, n = keys.shape
    a = n if samples is None else samples
    z = C * (keys - chunk_medians(keys, order))  # (b, n) logits of o'
    o = torch.cat(
        [
            hard_half_vector(keys, order).unsqueeze(1),  # (b, 1, n): round(o') with ties broken
            sample_half_vectors(b, n, order, a, generator=generator, device=keys.device),
        ],
        dim=1,
    )  # (b, S, n), S = a + 1
    log_on, log_off = F.logsigmoid(z), F.logsigmoid(-z)  # log o', log(1 - o')
    log_p = torch.where(o, log_on.unsqueeze(1), log_off.unsqueeze(1)).sum(-1)  # (b, S)
    log_p = log_p.masked_fill(duplicate_vector_mask(o), float("-inf"))
    weight = log_p.softmax(dim=1)  # (b, S): one entry per column per sample, so columns sum to 1

    rows = half_permutation_rows(o, order)  # (b, S, n), integer, no gradient
    flat = rows * n + torch.arange(n, device=keys.device)  # index of (r(o)_i, i) in a flat n x n
    values = weight.unsqueeze(-1).expand_as(flat)  # (b, S, n)
    matrix = keys.new_zeros(b, n * n).scatter_add(1, flat.flatten(1), values.flatten(1))
    return matrix.view(b, n, n)


def quicksort(
    keys: torch.Tensor,
    *,
    C: float = 10.0,
    samples: int | None = None,
    generator: torch.Generator | None = None,
    hard: bool = False,
) -> QuicksortSteps:
    """All ``log2 n`` half-permutations that sort ``keys`` ascending; ``keys`` is ``(b, n)``.

    ``hard=True`` uses the hard vectors only (exact sort, no gradient to the keys); otherwise
    ``samples`` (default ``n``) random vectors per step, drawn from ``generator``.
    """
    if keys.dim() != 2:
        raise ValueError(f"keys must be (batch, n), got shape {tuple(keys.shape)}")
    n = keys.shape[1]
    if samples is not None and samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    steps, trace = [], [keys]
    for order in range(1, num_steps(n) + 1):
        if hard:
            step = half_permutation_matrix(hard_half_vector(keys, order), order, keys.dtype)
        else:
            step = soft_half_permutation(keys, order, C=C, samples=samples, generator=generator)
        keys = (step @ keys.unsqueeze(-1)).squeeze(-1)  # (b, n): keys travel with the data
        steps.append(step)
        trace.append(keys)
    return QuicksortSteps(steps, torch.stack(trace, dim=1))


def _apply(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``matrix @ x`` over the item axis of ``x: (b, n, *rest)``; ``matrix`` is ``(b, n, n)``."""
    flat = x.reshape(x.shape[0], x.shape[1], -1)  # (b, n, m)
    return (matrix @ flat).view_as(x)


def intermediate_inputs(steps: list[torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
    """``x_0 = x``, ``x_d = P_d x_{d-1}``: the data after every step; ``x`` is ``(b, n, ...)``."""
    out = [x]
    for step in steps:
        out.append(_apply(step, out[-1]))
    return out


def intermediate_targets(steps: list[torch.Tensor], target: torch.Tensor) -> list[torch.Tensor]:
    """``t_L = target`` (sorted), ``t_{d-1} = P_d^T t_d``; aligned with ``intermediate_inputs``.

    The paper's intermediate loss sums ``BCE(x_d, t_d)`` over ``d = 0 .. L``: the reversed steps
    tell every intermediate state what it should hold if the keys were in the right order.
    """
    out = [target]
    for step in reversed(steps):
        out.insert(0, _apply(step.transpose(-1, -2), out[0]))
    return out
