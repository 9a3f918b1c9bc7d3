"""Pooled normalisation whose cost follows the pairs that matter: truncated Gaussian tails.

Pooled normalisation (Algorithm 1 as written) gives every continuous tuple ``i`` of an instance a
weight on every integer tuple ``j`` of the instance's pool (the ``P = k * s`` tuples sampled for all
``k`` continuous tuples), ``w_ij = exp(l_ij) / Z_i`` with ``l_ij = -0.5 * sum_d (p_jd - mu_id)^2 /
sigma_id`` and ``Z_i = sum_j exp(l_ij)`` over the distinct pool tuples. Evaluating all pairs costs
``O(b * k * P)``; almost all of those weights are negligible once sigmas are small against the
tensor. This module evaluates only the pairs within a cut-off of each tuple's mean.

The bound. Let ``L_i`` be the largest ``l_ij`` over tuple ``i``'s *own* samples. They lie in the
pool, so ``Z_i >= exp(L_i)``. Keep every pool tuple with ``l_ij >= L_i - T``; each neglected one has
``exp(l_ij) < exp(L_i - T)`` and there are fewer than ``P`` of them, so the neglected share of tuple
``i``'s weight is ``delta_i < P * exp(-T)``. Choosing ``T = ln P + ln(1 / tail)`` gives
``delta_i < tail`` for every tuple, hence below ``tail`` of the total ``sum_i |nu_i|`` too. The kept
weights are renormalised over the kept pairs (a softmax per tuple), which moves them by
``sum_j |w~_ij - w_ij| = 2 delta_i``: the pooled values ``nu'`` change by at most
``2 * tail * sum_i |nu_i|`` in L1, and ``y = W x`` by at most that times ``max |x|``.

The search. ``l_ij >= L_i - T`` is the ellipsoid ``sum_d (p_jd - mu_id)^2 / sigma_id <= 2T - 2L_i``,
which holds the tuple's best own sample with a margin of ``2T``, so no neighbourhood is empty (at
worst a tuple keeps its own sample). Pool tuples are made unique (a duplicate carries no weight in
Algorithm 1 beyond its first occurrence) and sorted by a bit-field key: instance, the learned
dimensions but the last cut into blocks of ``H_d`` (a power of two), the last learned dimension,
the offsets inside the blocks, then the fixed (not learned) dimensions, which carry no density.
Each block a tuple's bounding box touches is then one key range, narrowed to the ellipsoid's
extent through the block's point nearest the mean; ranges are found with a table of cumulative
counts per cell (or a binary search where that table would be large). The pool is laid out in
rows of ``width`` tuples and each range becomes the whole rows that hold it (a superset: extra
pairs are evaluated exactly and only make the result closer to the reference). The pairs are
evaluated as dense ``(tiles, width)`` arrays, one dimension at a time, with the softmax per tuple
as scatter-added row sums and the values summed back into the pool by one sparse product. Cost
and memory are ``O(pairs + queries)``: linear in ``k`` for sigmas fixed relative to the tensor's
size, against ``O(k^2)`` for all pairs. ``bench_pooled.py`` measures both.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_TAIL",
    "NeighbourPool",
    "Tiles",
    "log_gap",
    "max_group",
    "neighbour_tiles",
    "neighbour_pool",
    "release_workspace",
    "truncated_pooled_values",
]

#: The default bound on the share of each tuple's pooled weight that truncation may neglect.
DEFAULT_TAIL = 1e-6

# Keys are int64: keep the key space of one group of instances below this.
_MAX_KEY = 2**62
# Costs in units of one evaluated pair, used to pick block and tile sizes (measured on CPU for the
# identity shape; the optimum is flat around them): one range query (two lookups or binary searches
# and its bookkeeping) and one tile (its gathers and scatter bookkeeping).
_QUERY_COST = 24.0
_TILE_COST = 16.0
_WIDTHS = (4, 8, 16, 32, 64, 128, 256)
# Range queries look up a table of cumulative counts while it has at most this many cells per
# distinct pool tuple (a table costs a pass over its cells; a binary search ~100 ns per query).
_TABLE_PER_KEY = 16
# Log weights (relative to the tuple's best own sample) are clamped here before exp: pairs in a
# block's overhang can lie so far out that exp underflows into slow denormals; clamped, their
# weight stays below e^-80 of the best one, far under any tail bound.
_FLOOR = -80.0


def log_gap(pool_size: int, tail: float) -> float:
    """``T = ln P + ln(1 / tail)``: pairs more than ``T`` below a tuple's best own sample in log
    weight hold, together, less than ``tail`` of that tuple's weight (see the module docstring)."""
    if not 0 < tail < 1:
        raise ValueError(f"tail must be in (0, 1), got {tail}")
    return math.log(max(pool_size, 1)) - math.log(tail)


@dataclass(frozen=True)
class NeighbourPool:
    """The distinct integer tuples of a batch's pool, sorted so that boxes are key ranges.

    ``keys (U,)`` sorted int32 or int64 (instance first, so each instance's tuples are contiguous);
    ``per_instance (b,)`` how many belong to each instance; ``coords (q, U)`` their learned
    coordinates (the means' dtype); ``rows``/``cols (U,)`` their flat output/input index with the
    instance folded in (``instance * prod(out) + row``). ``lo``/``hi (b, k, q)`` int64: the
    inclusive box of every continuous tuple over the learned dimensions; ``best (b, k)`` float64:
    the log weight of its best own sample; ``mu``, ``inv (b, k, q)`` and ``radius2 (b, k)``
    (float64) its mean, inverse variances and the squared radius of its ellipsoid. ``block`` the
    block size per enumerated dimension, ``radix`` the key's digit sizes (instance first),
    ``inner`` the key span of one (blocks, last-dimension) cell. ``peaked``: every best own sample
    is the tuple's nearest integer tuple. ``table``: where small enough, the number of keys before
    each cell (``locate``).
    """

    keys: Tensor
    per_instance: Tensor
    coords: Tensor
    rows: Tensor
    cols: Tensor
    lo: Tensor
    hi: Tensor
    best: Tensor
    mu: Tensor
    inv: Tensor
    radius2: Tensor
    peaked: bool
    block: tuple[int, ...]
    radix: tuple[int, ...]
    inner: int
    table: Tensor | None

    def locate(self, cells: Tensor) -> Tensor:
        """The position in ``keys`` of the first key at or after each cell ``(Q,)``: a lookup in
        the cumulative count of keys per cell where that table is small, else a binary search."""
        if self.table is not None:
            return _at(self.table, cells.clamp(max=len(self.table) - 1))
        return torch.searchsorted(self.keys, (cells * self.inner).to(self.keys.dtype))


@torch.no_grad()
def neighbour_pool(
    indices: Tensor,
    means: Tensor,
    sigmas: Tensor,
    shape: Sequence[int],
    in_shape: Sequence[int],
    learned: Sequence[int],
    tail: float,
) -> NeighbourPool:
    """Boxes for every tuple and the sorted distinct pool, for ``neighbour_tiles``.

    indices ``(b, k, s, r)`` int64 (each tuple's own samples; together the pool), means and sigmas
    ``(b, k, r)`` in index space (sigmas are variances); ``learned`` the dimensions with a density.
    The keys of the ``b`` instances must fit in int64 (``max_group``).
    """
    b, k, s, r = indices.shape
    learned = tuple(learned)
    fixed = tuple(d for d in range(r) if d not in learned)
    sizes = [shape[d] for d in learned]
    gap = log_gap(k * s, tail)

    # L_i: the best own sample, in float64 so that the bound holds up to float64 rounding; one
    # dimension at a time (a reduction over a short innermost axis is slow)
    mu = means.detach()[..., learned].double()  # (b, k, q)
    inv = sigmas.detach()[..., learned].double().reciprocal()  # (b, k, q)
    dist = indices.new_zeros((b, k, s), dtype=torch.float64)  # (b, k, s)
    for e, d in enumerate(learned):
        diff = indices[..., d] - mu[:, :, e, None]  # (b, k, s)
        dist.addcmul_(diff.square_(), inv[:, :, e, None])
    best_d, best = dist.min(-1)  # (b, k)
    best_l = best_d * -0.5  # (b, k)
    best_pt = torch.stack([indices[..., d].gather(2, best[..., None]).squeeze(2) for d in learned], -1)
    radius2 = (2 * gap - 2 * best_l).clamp(min=0)  # (b, k)
    half = (radius2[..., None] / inv).sqrt()  # (b, k, q)
    upper = mu.new_tensor(sizes) - 1  # (q,)
    # clamp in float64 first: huge sigmas give widths that no int64 holds
    lo = torch.minimum((mu - half).ceil().clamp(min=0), upper).long()  # (b, k, q)
    hi = torch.minimum((mu + half).floor().clamp(min=0), upper).long()
    lo, hi = torch.minimum(lo, best_pt), torch.maximum(hi, best_pt)  # never empty

    block = _block_sizes(lo, hi, b * k * s, sizes)
    # key digits, most significant first, each a bit field (every radix a power of two: keys
    # are built and read back with shifts): instance, blocks, last learned dimension, offsets in
    # the blocks, fixed dimensions
    sizes_of = [b, *(-(-n // h) for n, h in zip(sizes[:-1], block, strict=True)), sizes[-1], *block]
    sizes_of += [shape[d] for d in fixed]
    bits = [max(n - 1, 0).bit_length() for n in sizes_of]
    radix = [1 << n for n in bits]
    inner = math.prod(radix[len(sizes) + 1 :])

    digits = [torch.arange(b, device=indices.device)[:, None, None].expand(b, k, s)]
    digits += [indices[..., learned[d]] >> (h.bit_length() - 1) for d, h in enumerate(block)]
    digits.append(indices[..., learned[-1]])
    digits += [indices[..., learned[d]] & (h - 1) for d, h in enumerate(block)]
    digits += [indices[..., d] for d in fixed]
    keys = torch.zeros((b, k, s), dtype=torch.long, device=indices.device)
    for digit, n in zip(digits, bits, strict=True):
        keys = keys.bitwise_left_shift_(n).bitwise_or_(digit)
    if math.prod(radix) <= 2**31:  # int32 keys sort about three times faster
        keys = keys.int()
    keys = torch.unique(keys.flatten(), sorted=True)  # (U,) the distinct pool tuples, in order
    # read the digits back: instance and coordinates of every distinct tuple
    shifts = [sum(bits[i + 1 :]) for i in range(len(bits))]
    digit = [(keys >> shift) & (size - 1) for shift, size in zip(shifts, radix, strict=True)]
    owner = digit[0].long()  # (U,) instance
    q = len(learned)
    point: list[Tensor] = [digit[0]] * r
    for e, d in enumerate(learned[:-1]):
        point[d] = digit[1 + e] * block[e] + digit[q + 1 + e]
    point[learned[-1]] = digit[q]
    for f, d in enumerate(fixed):
        point[d] = digit[2 * q + f]
    split = r - len(in_shape)
    rows = owner * math.prod(shape[:split]) + _flat(point[:split], shape[:split])
    cols = owner * math.prod(in_shape) + _flat(point[split:], shape[split:])
    coords = torch.stack([point[d] for d in learned]).to(means.dtype)  # (q, U)
    per_instance = torch.bincount(owner, minlength=b)  # (b,)
    # the nearest integer tuple has the largest weight of all; when it is the best own sample
    # (always, for samples from ``sample_indices``) no pool tuple outweighs the own samples
    nearest = torch.minimum(mu.round().clamp(min=0), upper)  # (b, k, q)
    peak = (nearest - mu).square_().mul_(inv).sum(-1)  # (b, k)
    peaked = bool((best_d <= peak).all())
    # the cumulative count of keys per (instance, blocks, last-dimension index) cell turns each
    # range query into two lookups; worth it while the table is not much larger than the pool
    cells = math.prod(radix[: len(sizes) + 1])
    table = None
    if cells <= _TABLE_PER_KEY * len(keys):
        table = torch.zeros(cells + 1, dtype=torch.long, device=keys.device)
        table[1:] = torch.bincount(keys >> (inner.bit_length() - 1), minlength=cells).cumsum(0)
    return NeighbourPool(
        keys, per_instance, coords, rows, cols, lo, hi, best_l, mu, inv, radius2, peaked,
        tuple(block), tuple(radix), inner, table,
    )


def _flat(points: Sequence[Tensor], sizes: Sequence[int]) -> Tensor | int:
    """Row-major flat index (int64) of integer tuples given one ``(U,)`` tensor per dimension."""
    flat: Tensor | int = 0
    for point, size in zip(points, sizes, strict=True):
        flat = flat * size + point.long()
    return flat


def _block_sizes(lo: Tensor, hi: Tensor, pool: int, sizes: Sequence[int]) -> list[int]:
    """Block size per enumerated dimension (all learned dimensions but the last).

    A box of width ``w`` along a dimension cut into blocks of ``H`` touches about ``w / H + 1``
    blocks (one query each) and scans about ``w + H`` indices (pairs). With a query costing
    ``_QUERY_COST`` pairs and ``rho`` pool tuples per box slice of unit width, the sum is smallest at
    ``H = sqrt(_QUERY_COST * w / rho)``; ``rho`` is taken from the mean pool density.
    """
    q = len(sizes)
    if q == 1:
        return []
    width = (hi - lo + 1).flatten(0, 1).T.double()  # (q, b*k)
    w = width.median(1).values.tolist()  # one host sync per call
    density = pool / (lo.shape[0] * math.prod(sizes))  # pool tuples per cell of one instance
    out = []
    for d in range(q - 1):
        rho = max(density * math.prod(w[e] for e in range(q) if e != d), 1e-12)
        h = min(max(1.0, math.sqrt(_QUERY_COST * w[d] / rho)), sizes[d])
        out.append(1 << round(math.log2(h)))  # a power of two: block and offset are bit fields
    return out


def max_group(shape: Sequence[int], learned: Sequence[int]) -> int:
    """The most instances whose keys fit in int64 together (at least 1). Rounding each digit to a
    power of two at most doubles it, and blocks pad a dimension by less than its size: a
    dimension cut into blocks takes at most 4 times its size, any other (and the instance) 2."""
    per_instance = 2 * math.prod(shape) * 2 ** len(shape) * 2 ** max(len(learned) - 1, 0)
    return max(1, _MAX_KEY // per_instance)


@dataclass(frozen=True)
class Tiles:
    """The (tuple, pool tuple) pairs to evaluate, as whole rows of a tiled pool.

    The distinct pool is laid out as ``coords (q, G, width)``: each instance's tuples contiguous
    and padded to whole rows (``real (U,)`` is each tuple's slot). Tile ``c`` pairs tuple
    ``tuple[c]`` (into the flattened ``(b, k')`` tuples) with every pool tuple in row ``row[c]``;
    a tuple's rows are distinct and cover its box; every tuple has at least one. Tiles come sorted
    by row, ``row_start (G + 1,)`` marks where each row's tiles begin (a CSR structure), so pool
    rows are read in order and the tiles sum into the pool with one sparse product; sums per tuple
    are scatter-adds of row sums. ``partial`` lists the tiles whose row ends in padding and
    ``filled`` how many of its slots are real. ``peaked``: every tuple's best own sample is its
    nearest integer tuple, so no pool tuple outweighs it. A dense ``(tiles, width)`` layout keeps
    every per-pair operation contiguous, with the tuple's parameters broadcast along the row.
    """

    row: Tensor
    tuple: Tensor
    tuples: int
    coords: Tensor
    real: Tensor
    partial: Tensor
    filled: Tensor
    row_start: Tensor
    peaked: bool

    @property
    def width(self) -> int:
        return self.coords.shape[-1]

    @property
    def slots(self) -> int:
        """Pairs evaluated: tiles times width (all real pool tuples but the padding)."""
        return len(self.row) * self.width

    def per_tuple(self, tiles: Tensor) -> Tensor:
        """Sum per tuple: ``(C,)`` -> ``(T,)``."""
        return tiles.new_zeros(self.tuples).index_add_(0, self.tuple, tiles)

    def into_rows(self, scale: Tensor, tiles: Tensor) -> Tensor:
        """``out[g] = sum over tiles c in row g of scale[c] * tiles[c]``: ``(C,), (C, width) ->
        (G, width)``, one sparse-dense product."""
        with warnings.catch_warnings():  # "sparse CSR support is in beta": the product is not
            warnings.simplefilter("ignore", UserWarning)
            rows = torch.sparse_csr_tensor(
                self.row_start, torch.arange(len(self.row), dtype=torch.int, device=scale.device),
                scale,
                size=(self.coords.shape[1], len(self.row)), check_invariants=False,
            )
            return rows @ tiles


@torch.no_grad()
def neighbour_tiles(pool: NeighbourPool, tuples: slice | None = None) -> Tiles:
    """The tiles of every tuple in the slice ``tuples`` of ``k`` (all when None): the rows of the
    tiled pool that hold the distinct pool tuples in its box (a superset of the box)."""
    part = slice(None) if tuples is None else tuples
    lo, hi, mu, inv = (t[:, part].flatten(0, 1) for t in (pool.lo, pool.hi, pool.mu, pool.inv))
    radius2 = pool.radius2[:, part].flatten()  # (b*k,)
    b, k = pool.lo.shape[0], len(radius2) // pool.lo.shape[0]
    q = lo.shape[1]
    dev = lo.device
    # one range query per (tuple, block its box touches); queries grouped by tuple, keys rising
    block = torch.tensor(pool.block, dtype=torch.long, device=dev)  # (q-1,)
    blo, bhi = lo[:, :-1] // block, hi[:, :-1] // block  # (b*k, q-1)
    span = bhi - blo + 1
    count = span.prod(-1)  # (b*k,) queries per tuple
    owner = torch.repeat_interleave(count)  # (Q,) tuple of each query
    inst = torch.div(owner, k, rounding_mode="floor")  # (Q,)
    base = inst
    low, high = _at(lo[:, -1], owner), _at(hi[:, -1], owner)  # (Q,) range in the last dimension
    if q > 1:
        offset = torch.arange(len(owner), device=dev) - _at(count.cumsum(0) - count, owner)
        digits = [offset] * (q - 1)
        for d in range(q - 2, -1, -1):  # mixed radix over the span; the last one varies fastest
            sp = _at(span[:, d], owner)
            digits[d] = _at(blo[:, d], owner) + offset % sp
            offset = torch.div(offset, sp, rounding_mode="floor")
        # the ellipsoid's slice through the block: its extent along the last dimension, from the
        # block's point nearest the mean in the other dimensions
        rest = _at(radius2, owner)  # (Q,)
        for d, digit in enumerate(digits):
            base = base * pool.radix[1 + d] + digit
            m = _at(mu[:, d], owner)
            near = torch.minimum(torch.maximum(m, digit * pool.block[d]), digit * pool.block[d]
                                 + pool.block[d] - 1)
            rest = rest - (near - m).square_().mul_(_at(inv[:, d], owner))
        m = _at(mu[:, -1], owner)
        half = (rest.clamp(min=0) / _at(inv[:, -1], owner)).sqrt_()
        low = torch.maximum(low, (m - half).ceil().clamp(min=-1).long())
        high = torch.minimum(high, (m + half).floor().clamp(max=pool.radix[q]).long())
        high = torch.where(rest >= 0, high, low - 1)  # a block outside the ellipsoid: no range
    base = base * pool.radix[q]  # (Q,) the key's cell (key // inner) at last-dimension index 0
    first, stop = pool.locate(base + low), pool.locate(base + high + 1)  # (Q,) pool positions
    found = (stop - first).clamp_(min=0)

    # tile the pool: each instance's tuples padded to whole rows of ``width``
    width = _tile_width(first, found)
    per_row = -(-pool.per_instance // width)  # (b,) rows per instance
    pad = (per_row.cumsum(0) - per_row) * width - (pool.per_instance.cumsum(0) - pool.per_instance)
    owner_u = torch.repeat_interleave(pool.per_instance, output_size=len(pool.keys))  # (U,)
    real = torch.arange(len(pool.keys), device=dev) + _at(pad, owner_u)  # (U,) slot of each
    rows = int(per_row.sum())
    coords = pool.coords.new_zeros(pool.coords.shape[0], rows * width)
    coords.index_copy_(1, real, pool.coords)
    coords = coords.view(-1, rows, width)  # (q, G, width)

    # the rows each query's range covers; a tuple's ranges rise, so a row it shares with the
    # tuple's previous range is dropped from the later one and each (tuple, row) comes once
    start = first + _at(pad, inst)
    row0 = torch.div(start, width, rounding_mode="floor")
    row1 = torch.div(start + found - 1, width, rounding_mode="floor")
    last = torch.where(found > 0, owner * rows + row1, -1).cummax(0).values  # (Q,) tuple-major
    before = torch.cat([last.new_full((1,), -1), last[:-1]]) - owner * rows  # the tuple's last row
    row0 = torch.maximum(row0, before + 1)
    nrows = torch.where(found > 0, (row1 - row0 + 1).clamp_(min=0), 0)
    query = torch.repeat_interleave(nrows)  # (C,)
    row = _at(row0 - (nrows.cumsum(0) - nrows), query) + torch.arange(len(query), device=dev)
    # by row (int32 indices: half the memory traffic of int64)
    row, order = torch.sort(row.int())
    tup = _at(owner, _at(query, order)).int()

    # the last row of an instance may end in padding
    filled_rows = torch.full((rows,), width, dtype=torch.int, device=dev)
    ends = per_row.cumsum(0) - 1
    filled_rows[ends] = (pool.per_instance - (per_row - 1) * width).int()
    filled = _at(filled_rows, row)
    partial = (filled < width).nonzero().squeeze(1)
    row_start = torch.zeros(rows + 1, dtype=torch.int, device=dev)
    row_start[1:] = torch.bincount(row, minlength=rows).cumsum(0)
    return Tiles(
        row, tup, b * k, coords, real, partial, filled[partial], row_start, pool.peaked
    )


def _at(t: Tensor, index: Tensor) -> Tensor:
    """``t[index]`` along the first dimension (``index_select``: much faster than indexing)."""
    return t.index_select(0, index)


def _tile_width(first: Tensor, found: Tensor, sample: int = 4096) -> int:
    """The row width that minimises evaluated slots plus a fixed cost per tile, estimated on an
    evenly spread sample of the queries (one host sync)."""
    if not len(found):
        return _WIDTHS[0]
    if len(found) > sample:
        pick = torch.linspace(0, len(found) - 1, sample, device=found.device).long()
        first, found = first[pick], found[pick]
    widths = torch.tensor(_WIDTHS, device=found.device)  # (W,)
    lead = first[:, None] % widths  # (Q, W): where the range starts inside its first row
    tiles = torch.where(found[:, None] > 0, (lead + found[:, None] - 1) // widths + 1, 0)
    cost = (tiles * (widths + _TILE_COST)).sum(0)
    return _WIDTHS[int(cost.argmin())]


class _TruncatedPooled(torch.autograd.Function):
    """``nu'_u = sum_i nu_i w_iu`` over the pairs in ``tiles``, with ``w`` a softmax per tuple.

    Works on dense ``(tiles, width)`` arrays: pool coordinates are whole rows of the tiled pool,
    tuple parameters broadcast along rows, sums per tuple are row sums then scatter-adds over the
    tiles. The weights stay unnormalised (``e (C, width)``, saved for backward,
    with the normalisers ``norm (T,)``); normalisation and values are one scale per tile, applied
    by a sparse ``(rows, tiles)`` matrix that also sums the tiles into the pool's rows. Scratch
    buffers come from a per-thread workspace (``_Workspace``): a fresh large tensor costs more in
    page faults than the arithmetic on it. ``shift (T,)`` is the log weight of each tuple's best
    own sample, so every normaliser is at least 1.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, tiles: Tiles, shift: Tensor, means: Tensor, sigmas: Tensor, values: Tensor,
    ) -> Tensor:
        # shift (T,); means, sigmas (T, q); values (T,) -> (U,)
        coords, row, tup = tiles.coords, tiles.row, tiles.tuple
        inv = sigmas.reciprocal()  # (T, q)
        mu, half = _at(means, tup), _at(inv, tup).mul_(-0.5)  # (C, q): means and -1 / (2 sigma)
        e = coords[0].index_select(0, row).sub_(mu[:, :1]).square_().mul_(half[:, :1])  # (C, w)
        if coords.shape[0] > 1:
            buf = _WORKSPACE.get("forward", e)
            for d in range(1, coords.shape[0]):  # e = log weight: -sum_d (p_d - mu_d)^2 / 2 sigma_d
                torch.index_select(coords[d], 0, row, out=buf).sub_(mu[:, d, None]).square_()
                e.addcmul_(buf, half[:, d, None])
        e.sub_(_at(shift, tup)[:, None])  # over the best own sample
        if not tiles.peaked and e.numel() and e.max() > -_FLOOR:  # a pool tuple far better
            peak = e.new_full((tiles.tuples,), -math.inf).scatter_reduce_(0, tup, e.amax(1), "amax")
            e.sub_(_at(peak, tup)[:, None])
        e.clamp_(min=_FLOOR).exp_()
        if len(tiles.partial):  # padding at the end of an instance: no weight
            slots = torch.arange(tiles.width, device=e.device)
            e[tiles.partial] = e[tiles.partial].masked_fill_(slots >= tiles.filled[:, None], 0.0)
        norm = tiles.per_tuple(e.sum(1))  # (T,)
        # tensors only (not the Tiles): under checkpointing they are dropped until backward
        ctx.save_for_backward(means, inv, values, norm, e, coords, row, tup, tiles.real)
        ctx.tuples = tiles.tuples
        nu = tiles.into_rows(_at(values / norm, tup), e)  # (G, width)
        return nu.view(-1).index_select(0, tiles.real)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        means, inv, values, norm, e, coords, row, tup, real = ctx.saved_tensors
        width = coords.shape[-1]

        def per_tuple(t: Tensor) -> Tensor:  # (C,) -> (T,)
            return t.new_zeros(ctx.tuples).index_add_(0, tup, t)

        spread = grad.new_zeros(coords.shape[1] * width).index_copy_(0, real, grad)
        g = torch.index_select(spread.view(-1, width), 0, row, out=_WORKSPACE.get("g", e))
        term = _WORKSPACE.get("term", e)
        # w = e / norm. d nu'/d nu_i = sum_u w_iu g_u =: mean_i; the softmax gives
        # dl_iu = w_iu nu_i (g_u - mean_i) = scale_c * e_iu (g_u - mean_i), scale = nu / norm
        mean = per_tuple(torch.mul(e, g, out=term).sum(1)).div_(norm)  # (T,)
        grad_values = mean if ctx.needs_input_grad[4] else None
        dl = g.sub_(_at(mean, tup)[:, None]).mul_(e)  # (C, width), without the tile's scale
        scale = values / norm  # (T,)
        grad_means = torch.empty_like(means) if ctx.needs_input_grad[2] else None
        grad_sigmas = torch.empty_like(means) if ctx.needs_input_grad[3] else None
        diff = _WORKSPACE.get("diff", e)
        mu = _at(means, tup)  # (C, q)
        for d in range(coords.shape[0]):
            torch.index_select(coords[d], 0, row, out=diff).sub_(mu[:, d, None])  # p - mu
            torch.mul(dl, diff, out=term)  # dl * (p - mu)
            if grad_means is not None:  # dl/dmu = (p - mu) / sigma
                grad_means[:, d] = per_tuple(term.sum(1)) * scale * inv[:, d]
            if grad_sigmas is not None:  # dl/dsigma = (p - mu)^2 / (2 sigma^2)
                term.mul_(diff)
                grad_sigmas[:, d] = per_tuple(term.sum(1)) * scale * 0.5 * inv[:, d].square()
        return None, None, grad_means, grad_sigmas, grad_values


class _Workspace(threading.local):
    """Grow-only scratch buffers per thread, name, device and dtype (CPU only).

    The truncated form's temporaries are as large as its pair arrays (up to hundreds of MiB);
    allocated afresh every step, each costs a page fault per 4 KiB, often more than the arithmetic
    done on it. Buffers hold no state between uses (every use writes before it reads). CUDA's
    caching allocator already reuses memory, so there a fresh tensor is returned.
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple, Tensor] = {}

    def get(self, name: str, like: Tensor) -> Tensor:
        if like.device.type != "cpu":
            return torch.empty_like(like)
        key = (name, like.dtype)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < like.numel():
            buf = self.buffers[key] = torch.empty(like.numel(), dtype=like.dtype)
        return buf[: like.numel()].view(like.shape)

    def clear(self) -> None:
        self.buffers.clear()


_WORKSPACE = _Workspace()


def release_workspace() -> None:
    """Free this thread's scratch buffers (they are reused, not freed, between steps)."""
    _WORKSPACE.clear()


def truncated_pooled_values(
    pool: NeighbourPool, tiles: Tiles, tuples: slice, means: Tensor, sigmas: Tensor,
    values: Tensor, learned: Sequence[int],
) -> Tensor:
    """Pooled values ``(U,)`` over ``pool``'s distinct tuples from the tuples ``tuples`` of ``k``
    that ``tiles`` were found for: means, sigmas ``(b, k', r)``, values ``(b, k')``."""
    b, k, r = means.shape
    learned = list(learned)
    mu = means[..., learned].reshape(b * k, len(learned))  # (T, q)
    sig = sigmas[..., learned].reshape(b * k, len(learned))  # (T, q)
    shift = pool.best[:, tuples].reshape(b * k).to(means.dtype)  # (T,)
    return _TruncatedPooled.apply(tiles, shift, mu, sig, values.reshape(b * k))
