"""Numerical tests of the sampled sparse hyperlayer library (``estimators.sparse``)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from estimators.sparse import (
    AdaptiveSparseLayer,
    SparseGlimpse,
    SparseLayer,
    SparseLayerError,
    duplicate_mask,
    flat_index,
    glimpse_means,
    rounded_product,
    sample_indices,
    sparse_mv,
    sparse_product,
    transform_means,
    transform_sigmas,
    tuple_proportions,
)
from harness.testing import DEVICES


def _gen(device: str, seed: int = 0) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _dense(indices: torch.Tensor, values: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Reference: a dense W (b, *shape) with repeated indices summed, built with index_put_."""
    b, n, r = indices.shape
    w = torch.zeros(b, *shape, dtype=values.dtype, device=values.device)
    batch = torch.arange(b, device=indices.device)[:, None].expand(b, n)
    w.index_put_((batch, *indices.unbind(-1)), values, accumulate=True)
    return w


def _dense_apply(w: torch.Tensor, x: torch.Tensor, out_shape: tuple[int, ...]) -> torch.Tensor:
    b = x.shape[0]
    return torch.einsum("boi,bi->bo", w.reshape(b, math.prod(out_shape), -1), x.reshape(b, -1))


# ----------------------------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("normalise", ["tuple", "pooled"])
@pytest.mark.parametrize("chunk", [None, 2])
def test_gradcheck_through_means_sigmas_values_and_x(device, normalise, chunk):
    in_shape, out_shape = (3, 2), (4,)
    shape = out_shape + in_shape
    b, k = 2, 2
    g = _gen(device)
    dt = torch.float64
    means = (torch.rand(b, k, 3, generator=g, device=device, dtype=dt) * 2.6 + 0.2)
    means.requires_grad_()
    sigmas = (torch.rand(b, k, 3, generator=g, device=device, dtype=dt) + 0.3).requires_grad_()
    values = torch.randn(b, k, generator=g, device=device, dtype=dt).requires_grad_()
    x = torch.randn(b, *in_shape, generator=g, device=device, dtype=dt).requires_grad_()
    indices = sample_indices(means, shape, a_l=2, a_g=2, region=(2, 2, 2), generator=g)

    def f(x, means, sigmas, values):
        return sparse_product(
            x, means, sigmas, values, in_shape, out_shape, indices=indices,
            normalise=normalise, chunk=chunk,
        )

    # fast mode (random projections) for the chunked runs: same maths, checkpointed
    assert torch.autograd.gradcheck(f, (x, means, sigmas, values), fast_mode=chunk is not None)


def test_gradcheck_with_learn_dims():
    in_shape, out_shape = (2, 5), (3,)
    g = _gen("cpu", 1)
    dt = torch.float64
    means = torch.tensor([[[0.0, 1.0, 2.3], [2.0, 0.0, 3.6]]], dtype=dt, requires_grad=True)
    sigmas = torch.full((1, 2, 3), 0.7, dtype=dt, requires_grad=True)
    values = torch.randn(1, 2, dtype=dt, generator=g, requires_grad=True)
    x = torch.randn(1, *in_shape, dtype=dt, generator=g)
    indices = sample_indices(means, (3, 2, 5), a_l=1, a_g=1, learn_dims=(2,), generator=g)

    def f(means, sigmas, values):
        return sparse_product(
            x, means, sigmas, values, in_shape, out_shape, indices=indices, learn_dims=(2,)
        )

    assert torch.autograd.gradcheck(f, (means, sigmas, values))


def test_indices_carry_no_gradient():
    means = torch.rand(2, 3, 2, requires_grad=True) * 3
    indices = sample_indices(means, (4, 4), a_l=2, a_g=2)
    assert indices.dtype == torch.long and not indices.requires_grad


# ----------------------------------------------------------------------------------------------
# Exactness and expectation


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("normalise", ["tuple", "pooled"])
def test_small_sigma_integer_means_give_exact_sparse_product(device, normalise):
    in_shape, out_shape = (5, 3), (4, 2)
    shape = out_shape + in_shape
    b, k = 3, 6
    g = _gen(device, 2)
    dt = torch.float64
    upper = torch.tensor(shape, device=device) - 1
    ints = (torch.rand(b, k, 4, generator=g, device=device) * (upper + 1)).floor()  # (b, k, r)
    values = torch.randn(b, k, generator=g, device=device, dtype=dt)
    x = torch.randn(b, *in_shape, generator=g, device=device, dtype=dt)
    sigmas = torch.full((b, k, 4), 1e-3, device=device, dtype=dt)
    y = sparse_product(
        x, ints.to(dt), sigmas, values, in_shape, out_shape, a_l=3, a_g=3, normalise=normalise,
        generator=g,
    )
    expected = _dense_apply(_dense(ints.long(), values, shape), x, out_shape)
    torch.testing.assert_close(y.reshape(b, -1), expected)
    torch.testing.assert_close(sparse_mv(x, ints.long(), values, in_shape, out_shape), y)


def _expected_w(means, sigmas, values, shape, region, normalise):
    """Independent reference: E[W] by enumerating every local/global draw (a_l = a_g = 1)."""
    k, r = means.shape
    everything = list(itertools.product(*(range(h) for h in shape)))
    options = []
    for i in range(k):
        m = np.clip(means[i], 0, np.array(shape) - 1)
        rounded = np.round(m).astype(int)
        nearest = [
            tuple(int(np.ceil(m[d])) if (c >> d) & 1 else int(np.floor(m[d])) for d in range(r))
            for c in range(2**r)
        ]
        low = [min(max(rounded[d] - region[d] // 2, 0), shape[d] - region[d]) for d in range(r)]
        local = list(itertools.product(*(range(low[d], low[d] + region[d]) for d in range(r))))
        options.append([(nearest, loc, glo) for loc in local for glo in everything])

    def weights(points, i):
        pts = np.array(sorted(points), dtype=float)
        logp = -0.5 * (((pts - means[i]) ** 2) / sigmas[i]).sum(-1)
        p = np.exp(logp - logp.max())
        return [tuple(int(v) for v in pt) for pt in pts], p / p.sum()

    w = np.zeros(shape)
    if normalise == "tuple":  # tuples are independent: average each over its own draws
        for i, opts in enumerate(options):
            for nearest, loc, glo in opts:
                pts, p = weights({*nearest, loc, glo}, i)
                for pt, pj in zip(pts, p, strict=True):
                    w[pt] += values[i] * pj / len(opts)
        return w
    combos = list(itertools.product(*options))
    for combo in combos:
        pool = {t for nearest, loc, glo in combo for t in (*nearest, loc, glo)}
        for i in range(k):
            pts, p = weights(pool, i)
            for pt, pj in zip(pts, p, strict=True):
                w[pt] += values[i] * pj
    return w / len(combos)


@pytest.mark.parametrize("normalise", ["tuple", "pooled"])
def test_expected_w_matches_enumerated_dense_reference(normalise):
    in_shape, out_shape = (3,), (4,)
    shape = out_shape + in_shape
    # near the corners, so the local regions are shifted; the second mean is an integer on a bound
    means = np.array([[0.2, 0.6], [3.0, 2.0]])
    sigmas = np.array([[0.8, 0.5], [1.5, 2.0]])
    values = np.array([1.0, -0.7])
    region = (3, 3)
    expected = _expected_w(means, sigmas, values, shape, region, normalise)

    reps = 8000
    b = in_shape[0] * reps
    x = torch.eye(in_shape[0], dtype=torch.float64).repeat(reps, 1)  # (b, 3): basis vectors
    tm = torch.tensor(means).expand(b, -1, -1)
    ts = torch.tensor(sigmas).expand(b, -1, -1)
    tv = torch.tensor(values).expand(b, -1)
    y = sparse_product(
        x, tm, ts, tv, in_shape, out_shape, a_l=1, a_g=1, region=region, normalise=normalise,
        generator=_gen("cpu", 3),
    )  # (b, 4): instance j*... holds column j % 3 of its sampled W
    cols = y.reshape(reps, in_shape[0], out_shape[0]).transpose(1, 2)  # (reps, 4, 3)
    estimate = cols.mean(0).numpy()
    stderr = cols.std(0).numpy() / math.sqrt(reps)
    assert np.all(np.abs(estimate - expected) <= 5 * stderr + 1e-9), (estimate, expected)
    # the reference itself is a real mixture: every value is spread over more than one cell
    assert np.count_nonzero(np.abs(expected) > 1e-3) > 2


# ----------------------------------------------------------------------------------------------
# Bounds, duplicates, normalisation

SHAPES = [
    ((1,), (1,)),
    ((7,), (1,)),
    ((1,), (6,)),
    ((3, 2), (5,)),
    ((2, 1), (4, 3)),
    ((8, 8), (2, 2)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("in_shape", "out_shape"), SHAPES, ids=str)
def test_samples_stay_in_bounds_for_any_rank_and_edge_means(device, in_shape, out_shape):
    shape = out_shape + in_shape
    r = len(shape)
    upper = torch.tensor(shape, device=device, dtype=torch.float32) - 1
    g = _gen(device, 4)
    edges = torch.stack(
        [
            torch.zeros(r, device=device),
            upper,
            upper + 3.0,  # means outside the bounds are clamped
            torch.full((r,), -2.5, device=device),
            upper / 2,
            upper - 0.5,
        ]
    )  # (6, r)
    means = torch.cat([edges, torch.rand(20, r, generator=g, device=device) * upper])[None]
    indices = sample_indices(means, shape, a_l=5, a_g=5, region=(3,) * r, generator=g)
    assert indices.shape == (1, 26, 2**r + 10, r)
    assert (indices >= 0).all() and (indices <= upper.long()).all()
    # raw parameters at extreme values reach the edges but never leave them
    raw = torch.tensor([[-50.0] * r, [50.0] * r], device=device)
    index_means = transform_means(raw, shape)
    torch.testing.assert_close(index_means, torch.stack([torch.zeros(r, device=device), upper]))
    x = torch.randn(1, *in_shape, device=device)
    sig = torch.ones(1, 26, r, device=device)
    y = sparse_product(x, means, sig, torch.ones(1, 26, device=device), in_shape, out_shape,
                       indices=indices)
    assert y.shape == (1, *out_shape) and torch.isfinite(y).all()


def test_local_region_is_shifted_inside_the_bounds():
    shape = (10, 10)
    means = torch.tensor([[[0.0, 9.0], [9.0, 4.2]]])  # corners and an edge
    indices = sample_indices(means, shape, a_l=4000, a_g=0, region=(3, 4), generator=_gen("cpu"))
    local = indices[0, :, 4:]  # (2, a_l, 2)
    # aligned, not cropped: the full 3 x 4 box is reachable, and nothing else
    assert set(local[0, :, 0].tolist()) == {0, 1, 2}
    assert set(local[0, :, 1].tolist()) == {6, 7, 8, 9}
    assert set(local[1, :, 0].tolist()) == {7, 8, 9}
    assert set(local[1, :, 1].tolist()) == {2, 3, 4, 5}


def test_nearest_tuples_are_floor_ceil_combinations():
    indices = sample_indices(torch.tensor([[[1.25, 3.5, 0.0]]]), (4, 5, 2), a_l=0, a_g=0)
    got = {tuple(t) for t in indices[0, 0].tolist()}
    assert got == {(a, b, 0) for a in (1, 2) for b in (3, 4)}


@pytest.mark.parametrize("device", DEVICES)
def test_duplicates_are_never_counted_twice(device):
    shape = (3, 2)  # tiny, so that samples collide a lot
    b, k = 4, 5
    g = _gen(device, 5)
    means = torch.rand(b, k, 2, generator=g, device=device) * torch.tensor([2.0, 1.0], device=device)
    means[:, 0] = torch.tensor([1.0, 1.0], device=device)  # integer mean: floor == ceil
    sigmas = torch.full((b, k, 2), 2.0, device=device)
    indices = sample_indices(means, shape, a_l=6, a_g=6, generator=g)
    weights = tuple_proportions(indices, means, sigmas, shape)  # (b, k, s)
    torch.testing.assert_close(weights.sum(-1), torch.ones(b, k, device=device))
    flat = flat_index(indices, shape)
    for row_w, row_f in zip(weights.reshape(-1, weights.shape[-1]), flat.reshape(-1, flat.shape[-1]),
                            strict=True):
        live = row_f[row_w > 0].tolist()
        assert len(live) == len(set(live)) == len(set(row_f.tolist()))


def test_duplicate_mask_is_exact_on_large_indices():
    # Cantor-style float hashing cannot tell these apart; exact integers can
    big = 2**52
    flat = torch.tensor([[big + 1, big, big + 1, big + 2, big]])
    assert duplicate_mask(flat).tolist() == [[False, False, True, False, True]]


def test_flat_index_matches_reshape_order():
    shape = (3, 4, 5)
    t = torch.arange(60).reshape(shape)
    idx = torch.tensor([[2, 1, 3], [0, 3, 4], [1, 0, 0]])
    assert flat_index(idx, shape).tolist() == [t[2, 1, 3].item(), t[0, 3, 4].item(), 20]


# ----------------------------------------------------------------------------------------------
# Layers: adaptive vs free, eval, chunking, learn_dims


@pytest.mark.parametrize("device", DEVICES)
def test_adaptive_batched_form_agrees_with_free_form_per_instance(device):
    in_shape, out_shape, k, b = (4, 3), (5,), 6, 3
    torch.manual_seed(0)
    adaptive = AdaptiveSparseLayer(in_shape, out_shape, a_l=2, a_g=3).to(device)
    means_raw = torch.randn(b, k, 3, device=device)
    sigmas_raw = torch.randn(b, k, device=device)
    values = torch.randn(b, k, device=device)
    x = torch.randn(b, *in_shape, device=device)
    indices = adaptive.sample(transform_means(means_raw, adaptive.shape), _gen(device, 6))
    y = adaptive(x, means_raw, sigmas_raw, values, indices=indices)
    adaptive.eval()
    y_eval = adaptive(x, means_raw, sigmas_raw, values)

    free = SparseLayer(in_shape, out_shape, k, a_l=2, a_g=3).to(device)
    for i in range(b):
        with torch.no_grad():
            free.means_raw.copy_(means_raw[i])
            free.sigmas_raw.copy_(sigmas_raw[i])
            free.values.copy_(values[i])
        free.train()
        torch.testing.assert_close(free(x[i : i + 1], indices=indices[i : i + 1]), y[i : i + 1])
        free.eval()
        torch.testing.assert_close(free(x[i : i + 1]), y_eval[i : i + 1])


@pytest.mark.parametrize("device", DEVICES)
def test_eval_uses_rounded_means_only(device):
    in_shape, out_shape = (6,), (6,)
    layer = SparseLayer(in_shape, out_shape, 6).to(device).eval()
    x = torch.eye(6, device=device)  # basis vectors read W column by column
    w = layer(x).T  # (out, in)
    upper = torch.tensor([5.0, 5.0], device=device)
    idx = torch.minimum(layer.means().detach().clamp(min=0), upper).round().long()
    expected = _dense(idx[None], layer.values.detach()[None], (6, 6))[0]
    torch.testing.assert_close(w, expected)
    torch.testing.assert_close(layer(x), layer(x))  # deterministic
    torch.testing.assert_close(
        rounded_product(x, layer.means().expand(6, -1, -1), layer.values.expand(6, -1),
                        in_shape, out_shape),
        layer(x),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("normalise", ["tuple", "pooled"])
def test_chunked_gradient_accumulation_matches_one_pass(device, normalise):
    torch.manual_seed(1)
    one = SparseLayer((9,), (7,), 10, normalise=normalise).to(device)
    chunked = SparseLayer((9,), (7,), 10, normalise=normalise, chunk=3).to(device)
    chunked.load_state_dict(one.state_dict())
    x = torch.randn(4, 9, device=device, requires_grad=True)
    indices = one.sample_batch(4, _gen(device, 7))
    grads = []
    for layer in (one, chunked):
        x.grad = None
        y = layer(x, indices=indices)
        (y.square().sum() + y.sum()).backward()  # a non-linear loss of the whole output
        grads.append([y.detach(), x.grad.clone()] + [p.grad.clone() for p in layer.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_learn_dims_fix_the_other_dimensions():
    shape = (2, 3, 4, 9)  # rank 4, only the last two dimensions learned
    means = torch.tensor([[[1.0, 2.0, 1.4, 7.7], [0.0, 0.0, 3.0, 0.2]]])
    indices = sample_indices(means, shape, a_l=3, a_g=5, learn_dims=(2, 3), generator=_gen("cpu"))
    assert indices.shape == (1, 2, 4 + 3 + 5, 4)
    fixed = indices[..., :2]
    assert (fixed == means[..., :2].long()[:, :, None]).all()
    with pytest.raises(SparseLayerError, match="learn_dims"):
        sample_indices(means, shape, a_l=1, a_g=1, learn_dims=(2, 4))


# ----------------------------------------------------------------------------------------------
# Parameter maps, glimpses, errors


def test_transforms_follow_algorithm_1():
    shape = (8, 3)
    raw = torch.tensor([[0.0, 0.0]])
    torch.testing.assert_close(transform_means(raw, shape), torch.tensor([[3.5, 1.0]]))
    sig = transform_sigmas(torch.tensor([0.0]), shape, tau=0.1)
    sp2 = math.log1p(math.exp(2.0))
    torch.testing.assert_close(sig, torch.tensor([[sp2 * 0.8 + 0.1, sp2 * 0.3 + 0.1]]))


@pytest.mark.parametrize("device", DEVICES)
def test_glimpse_reads_rounded_pixels_in_eval_and_trains_the_boxes(device):
    torch.manual_seed(2)
    images = torch.randn(2, 2, 12, 10, device=device)
    boxes = torch.randn(2, 3, 4, device=device, requires_grad=True)
    layer = SparseGlimpse((2, 12, 10), size=4, glimpses=3, a_l=3, a_g=2, region=(3, 3)).to(device)
    out = layer(images, boxes)
    assert out.shape == (2, 3, 2, 4, 4)
    out.square().sum().backward()
    assert boxes.grad is not None and boxes.grad.abs().sum() > 0
    assert layer.sigmas_raw.grad is not None and layer.values.grad is not None

    layer.eval()
    means = glimpse_means(boxes.detach(), (2, 12, 10), 4).reshape(2, 3, 2, 4, 4, 7)
    rows, cols = means[..., 5].round().long(), means[..., 6].round().long()
    chan = torch.arange(2, device=device)[None, None, :, None, None]
    batch = torch.arange(2, device=device)[:, None, None, None, None]
    expected = images[batch, chan, rows, cols]  # (2, 3, 2, 4, 4)
    torch.testing.assert_close(layer(images, boxes), expected)


def test_bad_input_raises_specific_errors():
    with pytest.raises(SparseLayerError, match="in_shape"):
        SparseLayer((0,), (3,), 2)
    with pytest.raises(SparseLayerError, match="region"):
        SparseLayer((4,), (3,), 2, region=(2,))
    with pytest.raises(SparseLayerError, match="normalise"):
        SparseLayer((4,), (3,), 2, normalise="global")
    with pytest.raises(SparseLayerError, match="k"):
        SparseLayer((4,), (3,), 0)
    with pytest.raises(SparseLayerError, match="x must be"):
        sparse_product(torch.ones(2, 5), torch.ones(2, 1, 2), torch.ones(2, 1, 2),
                       torch.ones(2, 1), (4,), (3,))
    with pytest.raises(SparseLayerError, match="2\\^62"):
        SparseLayer((2**40,), (2**40,), 1)


def test_training_moves_a_tuple_onto_the_target_entry():
    """Gradient descent through the proportions alone moves the mean to the right integer tuple."""
    torch.manual_seed(0)
    n, target = 6, (4, 1)
    layer = SparseLayer((n,), (n,), 1, a_l=2, a_g=2)
    with torch.no_grad():
        layer.means_raw.copy_(torch.tensor([[0.5, -0.9]]))  # index space (3.1, 1.4)
        layer.values.fill_(1.0)
    w = torch.zeros(n, n)
    w[target] = 1.0
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    for _ in range(300):
        x = torch.randn(32, n)
        loss = (layer(x) - x @ w.T).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.testing.assert_close(layer.means().detach(), torch.tensor([[4.0, 1.0]]), atol=0.05, rtol=0)
    assert layer.sigmas()[0, 0].item() < 0.2  # the variance shrank towards tau
    layer.eval()
    x = torch.randn(16, n)
    torch.testing.assert_close(layer(x), x @ w.T * layer.values.item())


@pytest.mark.parametrize("device", DEVICES)
def test_fix_values_keeps_unit_values_and_learns_only_the_structure(device):
    """``fix_values``: values are a buffer of ones (saved, moved, never optimised)."""
    torch.manual_seed(0)
    layer = SparseLayer((5,), (4,), 3, fix_values=True).to(device)
    names = {name for name, _ in layer.named_parameters()}
    assert names == {"means_raw", "sigmas_raw"}
    assert "values" in layer.state_dict() and layer.values.device.type == device
    torch.testing.assert_close(layer.values, torch.ones(3, device=device))
    layer(torch.randn(8, 5, device=device)).square().sum().backward()
    assert layer.means_raw.grad is not None and layer.means_raw.grad.abs().sum() > 0
    assert layer.sigmas_raw.grad is not None and layer.values.grad is None
    layer.eval()
    x = torch.randn(2, 5, device=device)
    idx = layer.means().detach().round().long()  # (3, 2): (row, col) of each unit entry
    w = torch.zeros(4, 5, device=device).index_put_(tuple(idx.T), layer.values, accumulate=True)
    torch.testing.assert_close(layer(x), x @ w.T)
