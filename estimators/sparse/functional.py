"""Stateless maths of the sampled sparse hyperlayer (Bloem et al. 2018, §2, Algorithm 1, app. A.2).

Conventions used throughout:

- ``x`` has shape ``(b, *in_shape)`` and ``y = W x`` has shape ``(b, *out_shape)``; ``W`` has shape
  ``out_shape + in_shape``, so an index tuple has rank ``r = len(out_shape) + len(in_shape)``
  (output dimensions first, then input dimensions). ``shape`` below always means that full tuple.
- *Means* are continuous index tuples in index space: dimension ``d`` lies in ``[0, shape[d] - 1]``.
  ``transform_means`` maps unconstrained values there as ``sigmoid(raw) * (shape[d] - 1)``.
- *Sigmas* are per-dimension **variances**, as in the paper (``diag(sigma)`` is the covariance)
  and its reference code, which divides squared distances by sigma: the proportion of integer
  tuple ``j`` under continuous tuple ``i`` is ``exp(-0.5 * sum_d (j_d - mu_id)^2 / sigma_id)``.
  The Gaussian's normalising constant cancels when proportions are normalised: never computed.
- Integer tuples are sampled under ``no_grad`` as ``int64``: gradients reach means, sigmas and
  values only through the proportions, never through the indices.
- The product flattens index tuples row-major (appendix A.2: ``fi(a, n) = sum_i a_i
  prod_{j>i} n_j``, the order of ``torch.reshape``) and computes ``y`` with a gather and a
  ``scatter_add``: memory is ``O(b * k * s)`` with ``s = 2^q + a_l + a_g`` samples per tuple;
  a dense ``W`` is never built.

Normalisation. ``normalise="tuple"`` (the default) normalises each continuous tuple's proportions
over *its own* ``s`` samples, which costs ``O(b * k * s)``. ``normalise="pooled"`` is the literal
Algorithm 1: every continuous tuple spreads its value over the samples of *all* ``k`` tuples of
its instance. It is the form that learns free structures such as the identity (§3.1): a tuple
feels the loss at entries sampled by any tuple, so tuples stuck on one entry find the empty ones,
which per-tuple normalisation, seeing only a tuple's own few samples, rarely does. Pooled comes in
two forms (``pooled=``): ``"all_pairs"``, the reference, evaluates every (tuple, pool tuple) pair,
``O(b * k^2 * s)``, which dominated the reference code's run time; ``"truncated"`` (the default,
``estimators.sparse.pooled``) evaluates only the pairs within a cut-off of each tuple's mean and
neglects less than ``tail`` (default 1e-6) of every tuple's weight, at a cost that follows the
pairs kept. In all forms duplicate integer tuples (found exactly on flat indices, per continuous
tuple or per pool) get proportion zero *before* normalising, and normalising happens in log space
(a softmax), so tiny densities never divide by zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from estimators.sparse import pooled as _pooled
from estimators.sparse.pooled import DEFAULT_TAIL

__all__ = [
    "DEFAULT_TAIL",
    "Normalise",
    "PooledForm",
    "SparseLayerError",
    "default_region",
    "duplicate_mask",
    "flat_index",
    "log_densities",
    "rounded_product",
    "samples_per_tuple",
    "sample_indices",
    "sparse_mv",
    "sparse_product",
    "transform_means",
    "transform_sigmas",
    "tuple_proportions",
    "weight_shape",
]

Normalise = Literal["tuple", "pooled"]
PooledForm = Literal["truncated", "all_pairs"]

# Flat indices are int64; keep the product of all sizes well clear of overflow.
_MAX_ELEMENTS = 2**62


class SparseLayerError(ValueError):
    """A shape, size or hyperparameter handed to the sparse layer that it cannot use."""


# ----------------------------------------------------------------------------------------------
# Validation


def _shape(name: str, shape: Sequence[int]) -> tuple[int, ...]:
    out = tuple(int(n) for n in shape)
    if any(n < 1 for n in out) or any(n != m for n, m in zip(out, shape, strict=True)):
        raise SparseLayerError(f"{name} must hold positive integers, got {tuple(shape)}")
    return out


def weight_shape(in_shape: Sequence[int], out_shape: Sequence[int]) -> tuple[int, ...]:
    """The shape of ``W``, ``out_shape + in_shape``, checked: positive sizes, int64-safe flat indices."""
    shape = _shape("out_shape", out_shape) + _shape("in_shape", in_shape)
    if not shape:
        raise SparseLayerError("in_shape and out_shape are both empty: W needs rank >= 1")
    if math.prod(shape) >= _MAX_ELEMENTS:
        raise SparseLayerError(
            f"W of shape {shape} has more than 2^62 elements: flat int64 indices would overflow"
        )
    return shape


def _learned(learn_dims: Sequence[int] | None, rank: int) -> tuple[int, ...]:
    if learn_dims is None:
        return tuple(range(rank))
    dims = tuple(int(d) for d in learn_dims)
    if not dims or len(set(dims)) != len(dims) or any(not 0 <= d < rank for d in dims):
        raise SparseLayerError(
            f"learn_dims must be distinct dimensions in [0, {rank}), got {tuple(learn_dims)}"
        )
    return tuple(sorted(dims))


def _region(region: Sequence[int] | None, shape: tuple[int, ...]) -> tuple[int, ...]:
    if region is None:
        return default_region(shape)
    reg = tuple(int(n) for n in region)
    if len(reg) != len(shape) or any(n < 1 for n in reg):
        raise SparseLayerError(
            f"region must hold {len(shape)} positive sizes (one per dimension of W), got "
            f"{tuple(region)}"
        )
    return tuple(min(n, h) for n, h in zip(reg, shape, strict=True))


def _pooled_form(pooled: str, tail: float) -> None:
    if pooled not in ("truncated", "all_pairs"):
        raise SparseLayerError(f"pooled must be 'truncated' or 'all_pairs', got {pooled!r}")
    if not 0 < tail < 1:
        raise SparseLayerError(f"tail must be in (0, 1), got {tail}")


def _counts(a_l: int, a_g: int) -> None:
    if a_l < 0 or a_g < 0:
        raise SparseLayerError(f"a_l and a_g must be >= 0, got a_l={a_l}, a_g={a_g}")


def _check_params(
    x: Tensor | None, means: Tensor, sigmas: Tensor | None, values: Tensor,
    in_shape: tuple[int, ...], rank: int,
) -> None:
    if means.dim() != 3 or means.shape[-1] != rank:
        raise SparseLayerError(f"means must be (b, k, {rank}), got {tuple(means.shape)}")
    b, k, _ = means.shape
    if sigmas is not None and tuple(sigmas.shape) != (b, k, rank):
        raise SparseLayerError(f"sigmas must be {(b, k, rank)}, got {tuple(sigmas.shape)}")
    if tuple(values.shape) != (b, k):
        raise SparseLayerError(f"values must be {(b, k)}, got {tuple(values.shape)}")
    if x is not None and tuple(x.shape) != (b, *in_shape):
        raise SparseLayerError(f"x must be {(b, *in_shape)}, got {tuple(x.shape)}")


# ----------------------------------------------------------------------------------------------
# Parameter maps


def default_region(shape: Sequence[int]) -> tuple[int, ...]:
    """The paper's local sampling region: ``ceil(log2 h)`` per dimension (at least 1, at most h)."""
    return tuple(min(h, max(1, math.ceil(math.log2(h)))) for h in shape)


def samples_per_tuple(learned: int, a_l: int, a_g: int) -> int:
    """``s``: the ``2^learned`` nearest tuples plus ``a_l`` local and ``a_g`` global ones."""
    return 2**learned + a_l + a_g


def transform_means(raw: Tensor, shape: Sequence[int]) -> Tensor:
    """Unconstrained ``(..., r)`` -> index space ``[0, h-1]``: ``sigmoid(raw) * (shape - 1)``."""
    upper = raw.new_tensor(shape) - 1  # (r,)
    return torch.sigmoid(raw) * upper


def transform_sigmas(raw: Tensor, shape: Sequence[int], tau: float = 0.1) -> Tensor:
    """One raw scalar per tuple ``(...)`` -> variances ``(..., r)``.

    ``softplus(raw + 2) * shape * 0.1 + tau`` (Algorithm 1): the same share of every dimension, and
    ``tau`` keeps the variance from collapsing (which helps the means escape local minima).
    """
    size = raw.new_tensor(shape)  # (r,)
    return F.softplus(raw + 2.0).unsqueeze(-1) * size * 0.1 + tau


# ----------------------------------------------------------------------------------------------
# Integer tuples


def flat_index(indices: Tensor, shape: Sequence[int]) -> Tensor:
    """Row-major flat index of integer tuples ``(..., len(shape))`` -> ``(...)`` (int64)."""
    flat = torch.zeros(indices.shape[:-1], dtype=torch.long, device=indices.device)
    for d, size in enumerate(shape):
        flat = flat * size + indices[..., d]
    return flat


@torch.no_grad()
def sample_indices(
    means: Tensor,
    shape: Sequence[int],
    *,
    a_l: int = 2,
    a_g: int = 2,
    region: Sequence[int] | None = None,
    learn_dims: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Integer tuples for each continuous tuple: means ``(b, k, r)`` -> ``(b, k, s, r)`` int64.

    Per continuous tuple, in this order along ``s``:
    - the ``2^q`` floor/ceil combinations of the mean over the ``q`` learned dimensions (an integer
      mean yields repeats, which the proportions then zero);
    - ``a_l`` tuples uniform in the box ``region`` around the rounded mean, the box shifted (not
      cropped) to lie inside the bounds, so every local sample is valid and equally likely;
    - ``a_g`` tuples uniform over all tuples.
    Dimensions outside ``learn_dims`` are fixed at the rounded mean in every sample (the glimpse
    case: only the input pixel of each output pixel is learned). Means outside the bounds are
    clamped first, so no sample is ever out of bounds.
    """
    shape = tuple(shape)
    rank = len(shape)
    learned = _learned(learn_dims, rank)
    reg = _region(region, shape)
    _counts(a_l, a_g)
    if means.dim() != 3 or means.shape[-1] != rank:
        raise SparseLayerError(f"means must be (b, k, {rank}), got {tuple(means.shape)}")
    b, k, _ = means.shape
    dev = means.device
    nearest = 2 ** len(learned)
    s = nearest + a_l + a_g

    upper = means.new_tensor(shape) - 1  # (r,)
    m = torch.minimum(means.detach().clamp(min=0), upper)  # (b, k, r)
    rounded = m.round().long()  # (b, k, r)
    floor, ceil = m.floor().long(), m.ceil().long()
    corner = torch.arange(nearest, device=dev)  # (2^q,): bit t picks ceil along learned dim t

    out = torch.empty(b, k, s, rank, dtype=torch.long, device=dev)  # (b, k, s, r)
    for d in range(rank):
        col = out[..., d]  # (b, k, s), a view that we fill
        if d not in learned:
            col.copy_(rounded[..., d, None].expand(b, k, s))
            continue
        bit = ((corner >> learned.index(d)) & 1).bool()  # (2^q,)
        col[..., :nearest] = torch.where(bit, ceil[..., d, None], floor[..., d, None])
        if a_l:
            # lower corner of the region, aligned so that [low, low + l) fits in [0, h)
            low = (rounded[..., d] - reg[d] // 2).clamp(0, shape[d] - reg[d])  # (b, k)
            offset = torch.randint(0, reg[d], (b, k, a_l), device=dev, generator=generator)
            col[..., nearest : nearest + a_l] = low[..., None] + offset
        if a_g:
            col[..., nearest + a_l :] = torch.randint(
                0, shape[d], (b, k, a_g), device=dev, generator=generator
            )
    return out


def duplicate_mask(flat: Tensor) -> Tensor:
    """``(..., s)`` int -> bool mask, True at every repeat of a value earlier in the same row.

    Exact (a stable sort of the integers themselves, not a hash), so the first occurrence keeps
    its proportion and each integer tuple is counted once.
    """
    ordered, order = flat.sort(dim=-1, stable=True)  # (..., s)
    repeat = torch.zeros_like(ordered, dtype=torch.bool)
    repeat[..., 1:] = ordered[..., 1:] == ordered[..., :-1]
    return torch.zeros_like(repeat).scatter(-1, order, repeat)


# ----------------------------------------------------------------------------------------------
# Proportions


def log_densities(
    points: Tensor, means: Tensor, sigmas: Tensor, learn_dims: Sequence[int] | None = None
) -> Tensor:
    """Unnormalised Gaussian log density ``-0.5 * sum_d (p_d - mu_d)^2 / sigma_d``.

    ``points`` (int tuples), ``means`` and ``sigmas`` broadcast against each other over
    ``(..., r)``; only ``learn_dims`` are summed (fixed dimensions carry no uncertainty).
    Returns ``(...)``.
    """
    if learn_dims is not None and len(learn_dims) < points.shape[-1]:
        dims = torch.tensor(learn_dims, device=points.device)
        points, means, sigmas = (t.index_select(-1, dims) for t in (points, means, sigmas))
    means, sigmas = torch.broadcast_tensors(means, sigmas)
    return _LogDensity.apply(points, means, sigmas)


class _LogDensity(torch.autograd.Function):
    """``log_densities`` with a hand-written backward.

    Autograd would keep two ``(..., s, q)`` float tensors alive per call and spend most of the
    layer's time on their broadcasting backward; this saves only the inputs and recomputes the
    difference once in backward. ``means`` and ``sigmas`` must have the same shape.
    """

    @staticmethod
    def forward(ctx, points: Tensor, means: Tensor, sigmas: Tensor) -> Tensor:  # type: ignore[override]
        inv = sigmas.reciprocal()  # (..., q)
        ctx.save_for_backward(points, means, inv)
        diff = points.to(means.dtype) - means  # (..., s, q)
        return diff.square_().mul_(inv).sum(-1).mul_(-0.5)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor, Tensor]:  # type: ignore[override]
        points, means, inv = ctx.saved_tensors
        diff = points.to(means.dtype) - means  # (..., s, q)
        weighted = grad.unsqueeze(-1) * diff  # (..., s, q)
        # d/dmu = (p - mu) / sigma, d/dsigma = (p - mu)^2 / (2 sigma^2)
        grad_means = weighted.sum_to_size(means.shape) * inv
        grad_sigmas = weighted.mul_(diff).sum_to_size(inv.shape) * (0.5 * inv.square())
        return None, grad_means, grad_sigmas


def tuple_proportions(
    indices: Tensor,
    means: Tensor,
    sigmas: Tensor,
    shape: Sequence[int],
    learn_dims: Sequence[int] | None = None,
    repeats: Tensor | None = None,
) -> Tensor:
    """Per-tuple proportions: indices ``(b, k, s, r)`` -> ``(b, k, s)``, each row sums to one.

    Repeats within a row get exactly zero (see ``duplicate_mask``; pass ``repeats`` when already
    known); the softmax normalises in log space. Differentiable in ``means (b, k, r)`` and
    ``sigmas (b, k, r)``; indices are constants.
    """
    logp = log_densities(indices, means[:, :, None], sigmas[:, :, None], learn_dims)  # (b, k, s)
    if repeats is None:
        repeats = duplicate_mask(flat_index(indices, shape))  # (b, k, s)
    return logp.masked_fill(repeats, -math.inf).softmax(-1)


def _pooled_values(
    pool: Tensor, repeats: Tensor, means: Tensor, sigmas: Tensor, values: Tensor,
    learn_dims: Sequence[int] | None,
) -> Tensor:
    """Algorithm 1's ``nu'``: pool ``(b, P, r)`` -> ``(b, P)``, every tuple spread over the pool."""
    logp = log_densities(pool[:, None], means[:, :, None], sigmas[:, :, None], learn_dims)
    weights = logp.masked_fill(repeats[:, None], -math.inf).softmax(-1)  # (b, k, P)
    return torch.einsum("bk,bkp->bp", values, weights)


# ----------------------------------------------------------------------------------------------
# Products


def sparse_mv(
    x: Tensor,
    indices: Tensor,
    values: Tensor,
    in_shape: Sequence[int],
    out_shape: Sequence[int],
) -> Tensor:
    """Exact sparse product ``y = W x`` for a batch of COO tensors ``W``.

    x ``(b, *in_shape)``, indices ``(b, n, r)`` int64 (output dims first), values ``(b, n)`` ->
    ``(b, *out_shape)``. Repeated indices add up, as in any COO tensor. Memory ``O(b * n)``.
    """
    rows, cols = _rows_cols(indices, in_shape, out_shape)  # (b, n) each
    return _scatter_product(x, rows, cols, values, out_shape)


def _rows_cols(
    indices: Tensor, in_shape: Sequence[int], out_shape: Sequence[int]
) -> tuple[Tensor, Tensor]:
    """Flat output and input index (appendix A.2) of tuples ``(..., r)``: two ``(...)`` tensors."""
    split = len(out_shape)
    return flat_index(indices[..., :split], out_shape), flat_index(indices[..., split:], in_shape)


def _scatter_product(
    x: Tensor, rows: Tensor, cols: Tensor, values: Tensor, out_shape: Sequence[int]
) -> Tensor:
    """``y[b, rows] += values * x[b, cols]``; rows, cols, values ``(b, n)`` -> ``(b, *out_shape)``."""
    b = x.shape[0]
    flat_x = x.reshape(b, -1)  # (b, prod(in_shape))
    src = values * flat_x.gather(1, cols)  # (b, n)
    y = src.new_zeros(b, math.prod(out_shape)).scatter_add(1, rows, src)  # (b, prod(out))
    return y.view(b, *out_shape)


def rounded_product(
    x: Tensor, means: Tensor, values: Tensor, in_shape: Sequence[int], out_shape: Sequence[int]
) -> Tensor:
    """The deterministic (eval) structure: value ``nu_i`` at ``round(mean_i)``, clamped in bounds.

    means ``(b, k, r)`` in index space, values ``(b, k)``; x ``(b, *in)`` -> ``(b, *out)``.
    """
    shape = weight_shape(in_shape, out_shape)
    _check_params(x, means, None, values, tuple(in_shape), len(shape))
    upper = means.new_tensor(shape) - 1
    indices = torch.minimum(means.detach().clamp(min=0), upper).round().long()  # (b, k, r)
    return sparse_mv(x, indices, values, in_shape, out_shape)


def _tuple_chunk(
    x: Tensor, means: Tensor, sigmas: Tensor, values: Tensor, indices: Tensor,
    in_shape: tuple[int, ...], out_shape: tuple[int, ...], learn_dims: tuple[int, ...] | None,
) -> Tensor:
    rows, cols = _rows_cols(indices, in_shape, out_shape)  # (b, k, s) each
    repeats = duplicate_mask(rows * math.prod(in_shape) + cols)  # the full flat index
    weights = tuple_proportions(
        indices, means, sigmas, out_shape + in_shape, learn_dims, repeats
    )  # (b, k, s)
    contrib = weights * values[..., None]  # (b, k, s)
    return _scatter_product(x, rows.flatten(1), cols.flatten(1), contrib.flatten(1), out_shape)


def _pooled_chunk(
    x: Tensor, means: Tensor, sigmas: Tensor, values: Tensor, pool: Tensor, repeats: Tensor,
    in_shape: tuple[int, ...], out_shape: tuple[int, ...], learn_dims: tuple[int, ...] | None,
) -> Tensor:
    pooled = _pooled_values(pool, repeats, means, sigmas, values, learn_dims)  # (b, P)
    return sparse_mv(x, pool, pooled, in_shape, out_shape)


def _truncated_chunk(
    x: Tensor, means: Tensor, sigmas: Tensor, values: Tensor, pool: _pooled.NeighbourPool,
    part: slice, out_shape: tuple[int, ...], learned: tuple[int, ...],
) -> Tensor:
    tiles = _pooled.neighbour_tiles(pool, part)  # the pairs that matter, as rows of the pool
    pooled = _pooled.truncated_pooled_values(pool, tiles, part, means, sigmas, values, learned)
    src = pooled * x.reshape(-1).index_select(0, pool.cols)  # (U,)
    b = x.shape[0]
    y = src.new_zeros(b * math.prod(out_shape)).index_add_(0, pool.rows, src)
    return y.view(b, *out_shape)


def _truncated_product(
    x: Tensor, means: Tensor, sigmas: Tensor, values: Tensor, indices: Tensor,
    shape: tuple[int, ...], in_shape: tuple[int, ...], out_shape: tuple[int, ...],
    learned: tuple[int, ...], tail: float, step: int,
) -> Tensor:
    """Pooled ``y = W x`` over the pairs within the cut-off (``estimators.sparse.pooled``)."""
    b, k, _ = means.shape
    group = _pooled.max_group(shape, learned)  # instances whose int64 keys fit together
    ys = []
    for g in range(0, b, group):
        inst = slice(g, min(g + group, b))
        pool = _pooled.neighbour_pool(
            indices[inst], means[inst], sigmas[inst], shape, in_shape, learned, tail
        )
        y = None
        for start in range(0, k, step):
            part = slice(start, min(start + step, k))
            args = (x[inst], means[inst, part], sigmas[inst, part], values[inst, part], pool, part,
                    out_shape, learned)
            # checkpoint: keep no float intermediates now, re-run this chunk alone in backward
            y_part = (checkpoint(_truncated_chunk, *args, use_reentrant=False) if step < k
                      else _truncated_chunk(*args))
            y = y_part if y is None else y + y_part
        ys.append(y)
    return ys[0] if len(ys) == 1 else torch.cat(ys)


def sparse_product(
    x: Tensor,
    means: Tensor,
    sigmas: Tensor,
    values: Tensor,
    in_shape: Sequence[int],
    out_shape: Sequence[int],
    *,
    a_l: int = 2,
    a_g: int = 2,
    region: Sequence[int] | None = None,
    learn_dims: Sequence[int] | None = None,
    indices: Tensor | None = None,
    normalise: Normalise = "tuple",
    pooled: PooledForm = "truncated",
    tail: float = DEFAULT_TAIL,
    chunk: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The sampled sparse layer ``y = W x`` (Algorithm 1), batched and adaptive.

    x ``(b, *in_shape)``; means ``(b, k, r)`` and sigmas ``(b, k, r)`` in index space (see
    ``transform_means``/``transform_sigmas``); values ``(b, k)``. Returns ``(b, *out_shape)``.

    ``indices`` ``(b, k, s, r)`` reuses a sample from ``sample_indices`` (else one is drawn with
    ``generator``); ``learn_dims`` restricts sampling and densities to those dimensions.
    ``chunk`` bounds memory for very large ``k`` (appendix A.2): the output is summed over chunks of
    ``chunk`` continuous tuples, each checkpointed, so backward re-runs one chunk's forward and
    backward at a time over the same integer sample and accumulates the gradients; peak memory for
    the float intermediates is then ``O(b * chunk * s)`` (pooled all-pairs: ``O(b * chunk * k * s)``).

    ``pooled`` picks the form of ``normalise="pooled"``: ``"truncated"`` (default) keeps, for every
    tuple, the pool tuples whose log weight is within ``T = ln(k s) + ln(1 / tail)`` of its best
    own sample, so the weight it neglects is below ``tail`` of its total and ``y`` moves by at
    most ``2 * tail * sum_i |values_i| * max |x|`` from the exact (``"all_pairs"``) result. Proof
    and search: ``estimators.sparse.pooled``.
    """
    in_shape, out_shape = _shape("in_shape", in_shape), _shape("out_shape", out_shape)
    shape = weight_shape(in_shape, out_shape)
    rank = len(shape)
    _check_params(x, means, sigmas, values, in_shape, rank)
    learned = _learned(learn_dims, rank)
    dims = None if len(learned) == rank else learned
    if normalise not in ("tuple", "pooled"):
        raise SparseLayerError(f"normalise must be 'tuple' or 'pooled', got {normalise!r}")
    _pooled_form(pooled, tail)
    if chunk is not None and chunk < 1:
        raise SparseLayerError(f"chunk must be a positive number of tuples, got {chunk}")
    b, k, _ = means.shape
    if indices is None:
        indices = sample_indices(
            means, shape, a_l=a_l, a_g=a_g, region=region, learn_dims=learned, generator=generator
        )
    elif indices.dim() != 4 or tuple(indices.shape[:2]) != (b, k) or indices.shape[3] != rank:
        raise SparseLayerError(f"indices must be (b={b}, k={k}, s, {rank}), got {indices.shape}")

    step = k if chunk is None or not torch.is_grad_enabled() else chunk
    if normalise == "pooled" and pooled == "truncated" and k > 0:
        return _truncated_product(
            x, means, sigmas, values, indices, shape, in_shape, out_shape, learned, tail, step
        )
    if normalise == "pooled":
        pool = indices.flatten(1, 2)  # (b, k*s, r)
        repeats = duplicate_mask(flat_index(pool, shape))  # (b, k*s)
        fn, fixed = _pooled_chunk, (pool, repeats)
    else:
        fn, fixed = _tuple_chunk, ()
    y = x.new_zeros(b, *out_shape) if k == 0 else None
    for start in range(0, k, step):
        part = slice(start, min(start + step, k))
        local = (indices[:, part],) if normalise == "tuple" else fixed
        args = (x, means[:, part], sigmas[:, part], values[:, part], *local)
        rest = (in_shape, out_shape, dims)
        # checkpoint: keep no float intermediates now, re-run this chunk alone in backward
        y_part = checkpoint(fn, *args, *rest, use_reentrant=False) if step < k else fn(*args, *rest)
        y = y_part if y is None else y + y_part
    assert y is not None  # the loop ran at least once since k >= 1
    return y
