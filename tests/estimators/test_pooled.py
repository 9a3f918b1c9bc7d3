"""Truncated pooled normalisation (``estimators.sparse.pooled``) against the all-pairs reference."""

from __future__ import annotations

import math

import pytest
import torch

from estimators.sparse import (
    SparseLayer,
    SparseLayerError,
    duplicate_mask,
    flat_index,
    sample_indices,
    sparse_product,
)
from estimators.sparse import pooled as P
from harness.testing import DEVICES


def _gen(device: str, seed: int = 0) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# Layouts: (in_shape, out_shape, means (b, k, r), sigmas (b, k, r), sampling kwargs)


def _layout(name: str, device: str, dtype: torch.dtype = torch.float64):
    g = _gen(device, 11)

    def rand(*size):
        return torch.rand(*size, generator=g, device=device, dtype=dtype)

    in_shape, out_shape, b, k = (20,), (24,), 3, 16
    kw = {"a_l": 3, "a_g": 4}
    if name == "rank4":
        in_shape, out_shape, b, k = (5, 4), (6, 3), 2, 10
    if name == "learn_dims":  # two fixed dimensions carry no density: pooled across them
        in_shape, out_shape, b, k = (3, 9), (2, 7), 2, 8
        kw["learn_dims"] = (1, 3)
    if name == "duplicates":  # a tiny W and many samples: most samples are repeats
        in_shape, out_shape, b, k = (3,), (2,), 2, 6
        kw = {"a_l": 6, "a_g": 8}
    shape = out_shape + in_shape
    r = len(shape)
    upper = torch.tensor(shape, device=device, dtype=dtype) - 1
    means = rand(b, k, r) * upper
    sigmas = rand(b, k, r) * 3 + 0.1  # per instance and per tuple: the adaptive case
    if name == "one_spot":  # every mean at the same point
        means = torch.full_like(means, 7.3)
    elif name == "boundary":  # on the bounds, at the corners and beyond them (clamped)
        edges = torch.stack([upper * 0, upper, upper + 2.5, -1.7 + upper * 0, upper.clone()])
        edges[-1, 0] = 0.0
        means[:, :5] = edges
    elif name == "huge_sigmas":  # every box covers the whole tensor: truncation keeps all
        sigmas = sigmas * 1e4
    elif name == "tiny_sigmas":  # the best own sample takes (almost) all of a tuple's weight
        sigmas = sigmas * 1e-3
    elif name == "mixed_sigmas":  # per-tuple sigmas over eight orders of magnitude
        sigmas = 10 ** (rand(b, k, 1) * 8 - 4) * torch.ones_like(sigmas)
    return in_shape, out_shape, means, sigmas, kw


LAYOUTS = [
    "random", "one_spot", "boundary", "huge_sigmas", "tiny_sigmas", "mixed_sigmas", "duplicates",
    "rank4", "learn_dims",
]


def _both(in_shape, out_shape, means, sigmas, kw, tail=P.DEFAULT_TAIL, seed=0):
    """y and the gradients of a fixed non-linear loss, for the all-pairs and truncated forms."""
    device, dtype = means.device, means.dtype
    shape = out_shape + in_shape
    g = _gen(device.type, seed)
    b, k, _ = means.shape
    values = torch.randn(b, k, generator=g, device=device, dtype=torch.float64).to(dtype)
    x = torch.randn(b, *in_shape, generator=g, device=device, dtype=torch.float64).to(dtype)
    indices = sample_indices(means, shape, generator=g, **kw)
    learn = kw.get("learn_dims")
    out = {}
    for form in ("all_pairs", "truncated"):
        leaves = [t.clone().requires_grad_() for t in (x, means, sigmas, values)]
        y = sparse_product(
            *leaves, in_shape, out_shape, indices=indices, normalise="pooled", pooled=form,
            tail=tail, learn_dims=learn,
        )
        weights = torch.linspace(-1, 2, y.numel(), device=device, dtype=dtype).view_as(y)
        (y * weights + 0.3 * y.square()).sum().backward()
        out[form] = (y.detach(), *(leaf.grad for leaf in leaves))
    return out, values, x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_truncated_matches_all_pairs_forward_and_gradients(device, layout):
    in_shape, out_shape, means, sigmas, kw = _layout(layout, device)
    out, values, x = _both(in_shape, out_shape, means, sigmas, kw)
    (y_ref, *g_ref), (y, *g) = out["all_pairs"], out["truncated"]
    # the stated bound: sum_o |y - y_ref| <= 2 * tail * sum_i |nu_i| * max |x|, per instance
    bound = 2 * P.DEFAULT_TAIL * values.abs().sum(1) * x.flatten(1).abs().amax(1)
    assert ((y - y_ref).flatten(1).abs().sum(1) <= bound + 1e-12).all()
    for name, a, ref in zip(("x", "means", "sigmas", "values"), g, g_ref, strict=True):
        torch.testing.assert_close(a, ref, rtol=1e-5, atol=1e-7, msg=f"d/d{name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["random", "boundary", "mixed_sigmas"])
def test_float32_agrees_with_the_references(device, layout):
    """In float32 (what training uses) the truncated form matches the all-pairs form to float32
    rounding, and its output matches the float64 reference."""
    in_shape, out_shape, means, sigmas, kw = _layout(layout, device)
    out64, values, x = _both(in_shape, out_shape, means, sigmas, kw)
    out32, _, _ = _both(in_shape, out_shape, means.float(), sigmas.float(), kw)
    for a, ref in zip(out32["truncated"], out32["all_pairs"], strict=True):
        # sigma gradients at sigma ~ 1e-3 (mixed_sigmas) cancel terms ~1e5 times larger than
        # themselves: float32 rounding alone moves them by ~1e-4 of the largest gradient
        scale = ref.abs().max().item()
        torch.testing.assert_close(a, ref, rtol=1e-4, atol=1e-4 * scale)
    torch.testing.assert_close(out32["truncated"][0].double(), out64["all_pairs"][0], rtol=1e-4,
                               atol=1e-5)


@pytest.mark.parametrize("tail", [1e-1, 1e-3])
def test_a_looser_tail_stays_within_its_bound(tail):
    # mid-size sigmas on a larger tensor, so that truncation really drops pairs
    in_shape, out_shape, means, sigmas, kw = _layout("random", "cpu")
    sigmas = sigmas * 0.5
    out, values, x = _both(in_shape, out_shape, means, sigmas, kw, tail=tail)
    err = (out["truncated"][0] - out["all_pairs"][0]).flatten(1).abs().sum(1)
    bound = 2 * tail * values.abs().sum(1) * x.flatten(1).abs().amax(1)
    assert (err <= bound).all()
    assert err.max() > 0  # pairs were dropped: the bound was tested, not met trivially


def _kept_pairs(pool: P.NeighbourPool, tiles: P.Tiles, k: int) -> list[set[int]]:
    """For every flattened tuple, the distinct pool tuples (indices into pool.keys) it weighs."""
    slot_to_pool = torch.full((tiles.coords.shape[1] * tiles.width,), -1, dtype=torch.long)
    slot_to_pool[tiles.real] = torch.arange(len(pool.keys))
    rows = slot_to_pool.view(-1, tiles.width)
    kept: list[set[int]] = [set() for _ in range(tiles.tuples)]
    for t, row in zip(tiles.tuple.tolist(), tiles.row.tolist(), strict=True):
        members = [u for u in rows[row].tolist() if u >= 0]
        assert not kept[t] & set(members), "a pair evaluated twice"
        kept[t].update(members)
    return kept


@pytest.mark.parametrize("layout", ["random", "one_spot", "boundary", "mixed_sigmas", "rank4"])
@pytest.mark.parametrize("tail", [1e-6, 1e-2, 0.3])
def test_neglected_mass_is_below_the_tail_bound(layout, tail):
    """Every tuple's exact pooled weight outside its kept pairs is below ``tail``."""
    in_shape, out_shape, means, sigmas, kw = _layout(layout, "cpu")
    shape = out_shape + in_shape
    b, k, r = means.shape
    indices = sample_indices(means, shape, generator=_gen("cpu", 3), **kw)
    learned = tuple(range(r))
    pool = P.neighbour_pool(indices, means, sigmas, shape, in_shape, learned, tail)
    tiles = P.neighbour_tiles(pool)
    kept = _kept_pairs(pool, tiles, k)
    # exact weights over each instance's distinct pool, from scratch
    flat_pool = indices.flatten(1, 2)  # (b, P, r)
    live = ~duplicate_mask(flat_index(flat_pool, shape))  # (b, P)
    key_of = {}  # (instance, flat index) -> index into pool.keys
    for u, (row, col) in enumerate(zip(pool.rows.tolist(), pool.cols.tolist(), strict=True)):
        key_of[(row, col)] = u
    neglected = []
    for i in range(b):
        pts = flat_pool[i][live[i]]  # (U_i, r)
        logp = -0.5 * ((pts[None] - means[i, :, None]) ** 2 / sigmas[i, :, None]).sum(-1)  # (k, U_i)
        w = logp.softmax(-1)
        split = len(out_shape)
        rows = i * math.prod(out_shape) + flat_index(pts[:, :split], out_shape)
        cols = i * math.prod(in_shape) + flat_index(pts[:, split:], in_shape)
        ids = [key_of[(ro, co)] for ro, co in zip(rows.tolist(), cols.tolist(), strict=True)]
        for t in range(k):
            inside = torch.tensor([u in kept[i * k + t] for u in ids])
            neglected.append(1 - w[t, inside].sum().item())
    neglected = torch.tensor(neglected)
    assert (neglected < tail).all(), neglected.max()
    if tail == 0.3 and layout == "random":
        assert neglected.max() > 1e-4  # the cut-off really cuts: the check has teeth


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_truncated_in_float64(device):
    in_shape, out_shape = (7, 3), (6,)
    shape = out_shape + in_shape
    b, k = 2, 4
    g = _gen(device, 5)
    dt = torch.float64
    upper = torch.tensor(shape, device=device, dtype=dt) - 1
    means = (torch.rand(b, k, 3, generator=g, device=device, dtype=dt) * upper).requires_grad_()
    sigmas = (torch.rand(b, k, 3, generator=g, device=device, dtype=dt) + 0.2).requires_grad_()
    values = torch.randn(b, k, generator=g, device=device, dtype=dt).requires_grad_()
    x = torch.randn(b, *in_shape, generator=g, device=device, dtype=dt).requires_grad_()
    indices = sample_indices(means, shape, a_l=2, a_g=3, generator=g)
    # a loose tail, so that the kept pairs are a strict subset of the pool (the truncated
    # function itself is differentiated; its kept set does not move under gradcheck's steps)
    pool = P.neighbour_pool(indices, means, sigmas, shape, in_shape, (0, 1, 2), 0.05)
    assert P.neighbour_tiles(pool).slots < b * k * k * indices.shape[2]

    def f(x, means, sigmas, values):
        return sparse_product(
            x, means, sigmas, values, in_shape, out_shape, indices=indices, normalise="pooled",
            tail=0.05,
        )

    assert torch.autograd.gradcheck(f, (x, means, sigmas, values))


def test_gradcheck_truncated_with_learn_dims():
    in_shape, out_shape = (2, 6), (3,)
    g = _gen("cpu", 8)
    dt = torch.float64
    means = torch.tensor([[[0.0, 1.0, 2.3], [2.0, 0.0, 4.6], [1.0, 1.0, 0.4]]], dtype=dt)
    means.requires_grad_()
    sigmas = torch.full((1, 3, 3), 0.4, dtype=dt, requires_grad=True)
    values = torch.randn(1, 3, dtype=dt, generator=g, requires_grad=True)
    x = torch.randn(1, *in_shape, dtype=dt, generator=g)
    indices = sample_indices(means, (3, 2, 6), a_l=1, a_g=2, learn_dims=(2,), generator=g)

    def f(means, sigmas, values):
        return sparse_product(
            x, means, sigmas, values, in_shape, out_shape, indices=indices, learn_dims=(2,),
            normalise="pooled", tail=0.01,
        )

    assert torch.autograd.gradcheck(f, (means, sigmas, values))


@pytest.mark.parametrize("device", DEVICES)
def test_a_lone_tuple_keeps_its_own_sample(device):
    """Tiny sigmas, tuples far apart: each neighbourhood is the tuple's own rounded mean, so the
    product is exactly value times x at that entry."""
    in_shape, out_shape = (40,), (40,)
    means = torch.tensor([[[3.2, 5.9], [30.0, 20.4], [17.6, 38.4]]], device=device)
    sigmas = torch.full((1, 3, 2), 1e-3, device=device)
    values = torch.tensor([[1.5, -2.0, 0.5]], device=device)
    indices = sample_indices(means, (40, 40), a_l=2, a_g=0, region=(3, 3), generator=_gen(device))
    pool = P.neighbour_pool(indices, means, sigmas, (40, 40), in_shape, (0, 1), P.DEFAULT_TAIL)
    kept = _kept_pairs(pool, P.neighbour_tiles(pool), 3) if device == "cpu" else None
    if kept is not None:
        coords = pool.coords.T.round().long().tolist()
        expected = [(3, 6), (30, 20), (18, 38)]
        for t, pt in enumerate(expected):
            assert pt in [tuple(coords[u]) for u in kept[t]]
    x = torch.randn(1, 40, device=device)
    y = sparse_product(x, means, sigmas, values, in_shape, out_shape, indices=indices,
                       normalise="pooled")
    w = torch.zeros(40, 40, device=device)
    w[3, 6], w[30, 20], w[18, 38] = 1.5, -2.0, 0.5
    torch.testing.assert_close(y, x @ w.T)


def test_a_pool_tuple_far_better_than_the_own_samples_is_handled():
    """Given indices whose own samples lie far from the mean while another tuple's sample sits on
    it, the log weights run far above the best own sample: rescaled, not overflowing."""
    means = torch.tensor([[[2.0, 2.0], [9.0, 9.0]]], dtype=torch.float64)
    sigmas = torch.full((1, 2, 2), 0.05, dtype=torch.float64)
    values = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    indices = torch.tensor([[[[8, 8]], [[2, 2]]]])  # (1, 2, 1, 2): each owns the other's spot
    x = torch.randn(1, 10, dtype=torch.float64)
    ys = [
        sparse_product(x, means, sigmas, values, (10,), (10,), indices=indices, normalise="pooled",
                       pooled=form)
        for form in ("all_pairs", "truncated")
    ]
    assert torch.isfinite(ys[1]).all()
    torch.testing.assert_close(ys[1], ys[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pooled", ["truncated", "all_pairs"])
def test_chunked_pooled_matches_one_pass(device, pooled):
    torch.manual_seed(3)
    one = SparseLayer((12,), (9,), 11, normalise="pooled", pooled=pooled).to(device)
    chunked = SparseLayer((12,), (9,), 11, normalise="pooled", pooled=pooled, chunk=4).to(device)
    chunked.load_state_dict(one.state_dict())
    x = torch.randn(3, 12, device=device)
    indices = one.sample_batch(3, _gen(device, 4))
    grads = []
    for layer in (one, chunked):
        y = layer(x, indices=indices)
        (y.square().sum() + y.sum()).backward()
        grads.append([y.detach()] + [p.grad.clone() for p in layer.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_instances_split_into_groups_when_keys_would_overflow(monkeypatch):
    """Keys pack (instance, position) into int64; a batch too large for that runs in groups."""
    in_shape, out_shape, means, sigmas, kw = _layout("random", "cpu")
    whole, _, _ = _both(in_shape, out_shape, means, sigmas, kw)
    assert P.max_group(out_shape + in_shape, (0, 1)) >= 3
    monkeypatch.setattr(P, "_MAX_KEY", 24 * 20 * 2)  # room for one instance at a time
    assert P.max_group(out_shape + in_shape, (0, 1)) == 1
    grouped, _, _ = _both(in_shape, out_shape, means, sigmas, kw)
    for a, b in zip(grouped["truncated"], whole["truncated"], strict=True):
        torch.testing.assert_close(a, b)


def test_log_gap_gives_the_stated_bound():
    # P e^-T = tail
    for pool, tail in [(1, 1e-6), (4096, 1e-6), (10**6, 1e-3)]:
        assert pool * math.exp(-P.log_gap(pool, tail)) == pytest.approx(tail)


def test_bad_pooled_settings_raise_specific_errors():
    with pytest.raises(SparseLayerError, match="pooled must be"):
        SparseLayer((4,), (3,), 2, normalise="pooled", pooled="approximate")
    for tail in (0.0, 1.0, -1e-3):
        with pytest.raises(SparseLayerError, match="tail must be in"):
            SparseLayer((4,), (3,), 2, normalise="pooled", tail=tail)
    with pytest.raises(SparseLayerError, match="pooled must be"):
        sparse_product(torch.ones(1, 4), torch.ones(1, 1, 2), torch.ones(1, 1, 2),
                       torch.ones(1, 1), (4,), (3,), normalise="pooled", pooled="fast")
