"""Tests of the three ``sparse_matrix`` layers: sampled sparse, REINFORCE and dense."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import norm

from estimators.base import SparseMatrixSpec, StructureLayer
from estimators.plugins.dense import DenseMatrixLayer
from estimators.plugins.reinforce import ReinforceMatrixLayer, discretised_log_prob
from estimators.plugins.sparse import SparseMatrixLayer
from estimators.sparse import SparseLayerError
from harness.testing import DEVICES

SPEC = SparseMatrixSpec(in_shape=(6,), out_shape=(5,), k=6)


def _read_w(layer: StructureLayer, spec: SparseMatrixSpec, device: str) -> torch.Tensor:
    """W (out, in) of an eval-mode layer, read column by column with basis vectors."""
    n_in = torch.Size(spec.in_shape).numel()
    basis = torch.eye(n_in, device=device).reshape(n_in, *spec.in_shape)
    return layer(basis).reshape(n_in, -1).T


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "make",
    [
        lambda spec: SparseMatrixLayer(spec),
        lambda spec: ReinforceMatrixLayer(spec),
        lambda spec: DenseMatrixLayer(spec),
    ],
    ids=["sparse", "reinforce", "dense"],
)
def test_layers_follow_the_contract(device, make):
    spec = SparseMatrixSpec(in_shape=(3, 2), out_shape=(2, 2), k=5)
    torch.manual_seed(0)
    layer = make(spec).to(device)
    assert isinstance(layer, StructureLayer) and len(list(layer.parameters())) >= 1
    x = torch.randn(4, 3, 2, device=device)
    y = layer(x)
    assert y.shape == (4, 2, 2)
    layer.objective(y.square().sum((1, 2))).backward()
    assert all(p.grad is not None for p in layer.parameters() if p.requires_grad)
    layer.eval()
    w = _read_w(layer, spec, device)  # (4, 6)
    torch.testing.assert_close(layer(x).reshape(4, -1), x.reshape(4, -1) @ w.T)
    torch.testing.assert_close(_read_w(layer, spec, device), w)  # deterministic


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_layer_eval_structure_and_snapshot(device):
    torch.manual_seed(1)
    layer = SparseMatrixLayer(SPEC, a_l=2, a_g=3).to(device)
    layer(torch.randn(3, 6, device=device))
    snap = layer.snapshot()
    assert snap["means"].shape == (6, 2) and snap["sigmas"].shape == (6, 2)
    assert snap["values"].shape == (6,)
    assert snap["samples"].shape == (6, 4 + 2 + 3, 2) and snap["samples"].dtype == torch.long
    layer.eval()
    w = _read_w(layer, SPEC, device).cpu()
    idx = snap["means"].round().long()
    expected = torch.zeros(5, 6).index_put_(tuple(idx.T), snap["values"], accumulate=True)
    torch.testing.assert_close(w, expected)


def test_dense_layer_is_a_plain_linear_map():
    spec = SparseMatrixSpec(in_shape=(4, 2), out_shape=(3,), k=1)
    layer = DenseMatrixLayer(spec)
    assert layer.weight.shape == (3, 4, 2)
    assert layer.weight.abs().max() <= 8**-0.5
    x = torch.randn(5, 4, 2)
    torch.testing.assert_close(layer(x), torch.einsum("oij,bij->bo", layer.weight, x))
    assert layer.snapshot()["weight"].shape == (3, 4, 2)


# ----------------------------------------------------------------------------------------------
# REINFORCE


def test_discretised_log_prob_matches_scipy_and_sums_to_one():
    shape = (7, 4)
    means = torch.tensor([[0.3, 3.0], [5.9, 1.4]], dtype=torch.float64)
    sigmas = torch.tensor([[0.8, 2.5], [0.05, 0.6]], dtype=torch.float64)
    grid = torch.cartesian_prod(torch.arange(7), torch.arange(4))  # (28, 2): every tuple
    for i in range(2):
        logp = discretised_log_prob(grid, means[i], sigmas[i], shape)  # (28,)
        torch.testing.assert_close(logp.exp().sum(), torch.tensor(1.0, dtype=torch.float64))
        for j, (a, b) in enumerate(grid.tolist()):
            ref = 0.0
            for d, v in enumerate((a, b)):
                mu, sd = means[i, d].item(), sigmas[i, d].sqrt().item()
                lo = -float("inf") if v == 0 else v - 0.5
                hi = float("inf") if v == shape[d] - 1 else v + 0.5
                ref += float(torch.tensor(norm.cdf(hi, mu, sd) - norm.cdf(lo, mu, sd)).log())
            assert logp[j].item() == pytest.approx(ref, rel=1e-6, abs=1e-9)


def test_discretised_log_prob_gradients_are_finite_and_correct():
    shape = (5,)
    means = torch.tensor([[0.0], [4.0], [2.2], [1.0]], dtype=torch.float64, requires_grad=True)
    sigmas = torch.tensor([[0.3], [0.3], [1.1], [0.01]], dtype=torch.float64, requires_grad=True)
    points = torch.tensor([[0], [4], [3], [1]])

    def f(means, sigmas):
        return discretised_log_prob(points, means, sigmas, shape)

    assert torch.autograd.gradcheck(f, (means, sigmas))
    f(means, sigmas).sum().backward()
    assert torch.isfinite(means.grad).all() and torch.isfinite(sigmas.grad).all()


@pytest.mark.parametrize(
    ("baseline", "samples", "log_prob"),
    [
        ("moving_average", 1, "discretised"),
        ("leave_one_out", 4, "discretised"),
        ("leave_one_out", 0, "discretised"),  # one draw per instance, the others as baseline
        ("none", 0, "continuous"),  # the authors' form: per instance, no baseline, density of z
    ],
)
def test_reinforce_moves_the_mean_to_the_only_good_index(baseline, samples, log_prob):
    """Bandit: choosing input 5 of 8 gives loss 0, any other index loss 1."""
    torch.manual_seed(3)
    good, n = 5, 8
    layer = ReinforceMatrixLayer(
        SparseMatrixSpec(in_shape=(n,), out_shape=(1,), k=1), baseline=baseline, samples=samples,
        log_prob=log_prob,
    )
    with torch.no_grad():
        layer.means_raw.copy_(torch.tensor([[0.0, -1.5]]))  # start at index ~1.3
        layer.values.fill_(1.0)
    layer.values.requires_grad_(False)
    opt = torch.optim.Adam([layer.means_raw, layer.sigmas_raw], lr=0.05)
    x = torch.zeros(16, n)
    x[:, good] = 1.0
    start = layer.means()[0, 1].item()
    for _ in range(300):
        loss = (layer(x)[:, 0] - 1.0).square()  # (16,): 0 at the good index, 1 elsewhere
        opt.zero_grad()
        layer.objective(loss).backward()
        opt.step()
    end = layer.means()[0, 1].item()
    assert start < 2 and abs(end - good) < 0.5
    layer.eval()
    assert layer(x)[:, 0].eq(1.0).all()
    assert layer.snapshot()["samples"].shape == (1, 2)


def test_reinforce_surrogate_sign_on_one_step():
    """With a loss below the baseline the surrogate's gradient raises that draw's log-probability."""
    torch.manual_seed(4)
    layer = ReinforceMatrixLayer(SparseMatrixSpec(in_shape=(8,), out_shape=(1,), k=1), samples=1)
    x = torch.ones(2, 8)
    layer(x)
    draw = layer.snapshot()["samples"]
    layer.baseline.fill_(1.0)
    layer.baseline_set.fill_(True)
    surrogate = layer.objective(torch.zeros(2, requires_grad=True))
    surrogate.backward()
    before = discretised_log_prob(draw, layer.means(), layer.sigmas(), layer.shape).sum()
    with torch.no_grad():
        for p in (layer.means_raw, layer.sigmas_raw):
            p -= 1e-3 * p.grad
    after = discretised_log_prob(draw, layer.means(), layer.sigmas(), layer.shape).sum()
    assert after > before
    assert layer.baseline.item() == pytest.approx(0.9)  # decayed toward the loss 0
    assert layer.objective(torch.ones(2)).item() == 1.0  # surrogate used once, then plain mean


def test_reinforce_rejects_bad_settings():
    with pytest.raises(SparseLayerError, match="leave_one_out"):
        ReinforceMatrixLayer(SPEC, baseline="leave_one_out", samples=1)
    with pytest.raises(SparseLayerError, match="baseline must be"):
        ReinforceMatrixLayer(SPEC, baseline="mean")
    with pytest.raises(SparseLayerError, match="log_prob must be"):
        ReinforceMatrixLayer(SPEC, log_prob="exact")
    with pytest.raises(SparseLayerError, match="sigma must be one of"):
        ReinforceMatrixLayer(SPEC, sigma="stdev")
    layer = ReinforceMatrixLayer(SPEC, baseline="leave_one_out", samples=4)
    with pytest.raises(SparseLayerError, match="too small for 4 draws"):
        layer(torch.ones(2, 6))
    layer = ReinforceMatrixLayer(SPEC, baseline="leave_one_out")  # one draw per instance
    with pytest.raises(SparseLayerError, match="too small for 1 draws"):
        layer(torch.ones(1, 6))


def test_reinforce_draws_one_structure_per_instance_by_default():
    """The authors' estimator: every instance gets its own draw, and its own score term."""
    torch.manual_seed(5)
    spec = SparseMatrixSpec(in_shape=(16,), out_shape=(16,), k=16)
    x = torch.randn(1, 16).expand(64, 16)  # the same vector for every instance
    layer = ReinforceMatrixLayer(spec)
    y = layer(x)  # (64, 16): each instance's own W applied to it
    assert layer._log_prob.shape == (64,)
    assert len({tuple(row.tolist()) for row in y}) > 32  # (almost) every instance its own W
    shared = ReinforceMatrixLayer(spec, samples=1)
    y = shared(x)
    assert shared._log_prob.shape == (1,)
    assert torch.equal(y, y[:1].expand_as(y))  # one structure for the whole batch


def test_reinforce_log_probabilities_are_the_documented_ones():
    """continuous: the Gaussian density of the unrounded draw; discretised: the rounded cell's mass."""
    spec = SparseMatrixSpec(in_shape=(8,), out_shape=(8,), k=8)
    for kind in ("continuous", "discretised"):
        torch.manual_seed(6)
        layer = ReinforceMatrixLayer(spec, samples=1, log_prob=kind)
        torch.manual_seed(7)
        layer(torch.ones(1, 8))
        got = layer._log_prob
        means, sigmas = layer.means(), layer.sigmas()
        torch.manual_seed(7)
        z = means + sigmas.sqrt() * torch.randn(1, *means.shape)  # the draw forward made
        if kind == "continuous":
            want = torch.distributions.Normal(means, sigmas.sqrt()).log_prob(z).sum((-2, -1))
        else:
            draws = torch.minimum(z.round().clamp(min=0), torch.tensor([7.0, 7.0])).long()
            want = discretised_log_prob(draws, means, sigmas, (8, 8)).sum(-1)
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize(("form", "spread"), [("variance", 3.7), ("std", 13.7)])
def test_reinforce_sigma_form_sets_the_initial_spread_at_n_64(form, spread):
    """The untrained draw's spread in index units: sqrt(13.7) = 3.7 when sigma is a variance (ours,
    the sparse layer's reading), 13.7 when it is a standard deviation (the authors' REINFORCE)."""
    torch.manual_seed(8)
    spec = SparseMatrixSpec(in_shape=(64,), out_shape=(64,), k=64)
    layer = ReinforceMatrixLayer(spec, samples=1, log_prob="continuous", sigma=form)
    with torch.no_grad():
        layer.means_raw.zero_()  # every mean at 31.5, mid-matrix, so clamping rarely bites
    assert layer.sigmas().sqrt().flatten().unique().item() == pytest.approx(spread, abs=0.05)
    offsets = []
    for _ in range(200):  # one structure per forward; its first draw is kept for Fig. 3
        layer(torch.ones(1, 64))
        offsets.append(layer._last_sample.float().flatten() - 31.5)
    offsets = torch.cat(offsets)
    # rounding adds 1/12 to the variance; clamping at +-32 trims the wide form's tails a little
    assert offsets.std().item() == pytest.approx(spread, rel=0.06)


def test_reinforce_fixed_values_are_ones_and_not_trained():
    spec = SparseMatrixSpec(in_shape=(6,), out_shape=(6,), k=6)
    fixed = ReinforceMatrixLayer(spec, fix_values=True)
    assert torch.equal(fixed.values, torch.ones(6))
    assert "values" not in dict(fixed.named_parameters())
    learned = ReinforceMatrixLayer(spec)
    assert "values" in dict(learned.named_parameters())


@pytest.mark.parametrize("seed", [0, 1])
def test_sparse_layer_learns_the_exact_identity_with_fixed_values(seed):
    """Paper §3.1 in miniature: pooled proportions and unit values reach W = I after rounding."""
    torch.manual_seed(seed)
    n = 6
    spec = SparseMatrixSpec(in_shape=(n,), out_shape=(n,), k=n)
    layer = SparseMatrixLayer(spec, a_l=1, a_g=2, fix_values=True)
    assert layer.sparse.normalise == "pooled"  # the documented default (Algorithm 1)
    opt = torch.optim.Adam(layer.parameters(), lr=0.02)
    for _ in range(400):
        x = torch.randn(32, n)
        loss = (layer(x) - x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    layer.eval()
    torch.testing.assert_close(_read_w(layer, spec, "cpu"), torch.eye(n), atol=0, rtol=0)
