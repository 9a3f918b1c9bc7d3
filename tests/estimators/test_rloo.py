"""The ``rloo`` estimator (Kool et al. 2019) against exact gradients on problems small enough to
enumerate: the expected gradient of the leave-one-out estimator equals the gradient of the expected
loss within Monte-Carlo error (unbiased), for Plackett-Luce orderings of 4 keys, for a 3 x 3
sparse matrix of 2 integer tuples and for a one-pixel glimpse of a 3 x 3 image; and its variance is
below plain REINFORCE's at the same number of samples. ``pytest -s`` prints the figures (bias in
standard errors, variances)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from estimators.base import GlimpseSpec, PermutationSpec, SparseMatrixSpec, repeat_samples
from estimators.plugins.reinforce import (
    PlackettLuceLayer,
    ReinforceMatrixLayer,
    discretised_log_prob,
)
from estimators.plugins.rloo import (
    RlooEstimator,
    RlooGlimpse,
    RlooMatrixLayer,
    RlooPlackettLuceLayer,
)
from estimators.shared.plackett_luce import plackett_luce_log_prob
from estimators.shared.score_function import leave_one_out
from harness.testing import DEVICES, assert_conforms

SAMPLES = 4
Z = 5.0  # |mean - exact| below Z standard errors in every coordinate


def test_leave_one_out_averages_the_other_samples_of_each_instance():
    loss = torch.tensor([1.0, 10.0, 2.0, 20.0, 6.0, 60.0])  # S = 3 samples of b = 2 instances
    expected = torch.tensor([4.0, 40.0, 3.5, 35.0, 1.5, 15.0])
    torch.testing.assert_close(leave_one_out(loss, 3), expected)
    with pytest.raises(ValueError, match="samples >= 2"):
        leave_one_out(loss, 1)
    with pytest.raises(ValueError, match=r"\(S \* b,\) with S = 4"):
        leave_one_out(loss, 4)


def _report(name: str, estimate: torch.Tensor, exact: torch.Tensor, err: torch.Tensor) -> float:
    """Print and return the largest |bias| in standard errors."""
    z = ((estimate - exact).abs() / err).max().item()
    print(f"\n{name}: max |mean - exact| = {(estimate - exact).abs().max().item():.3g} "
          f"({z:.2f} standard errors); |exact| = {exact.abs().max().item():.3g}")
    return z


# ---- Plackett-Luce, n = 4 ------------------------------------------------------------------------

N = 4
PERMS = torch.tensor(list(itertools.permutations(range(N))))  # (24, n): item at every position


def _perm_index(perm: torch.Tensor) -> torch.Tensor:
    """Row of ``PERMS`` of every ordering ``(m, n)``."""
    codes = (perm * N ** torch.arange(N, device=perm.device)).sum(-1)
    lookup = torch.full((N**N,), -1, dtype=torch.long, device=perm.device)
    lookup[(PERMS.to(perm.device) * N ** torch.arange(N, device=perm.device)).sum(-1)] = torch.arange(
        len(PERMS), device=perm.device)
    return lookup[codes]


def _pl_problem(device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys, a loss per ordering (in [1, 2]: far from 0, where a baseline matters) and the exact
    gradient of the expected loss in the keys, by enumerating all 24 orderings."""
    keys = torch.tensor([0.3, -0.5, 1.0, 0.1], dtype=torch.float64, device=device)
    table = 1 + torch.rand(len(PERMS), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    table = table.to(device)
    leaf = keys.clone().requires_grad_()
    log_p = plackett_luce_log_prob(leaf.expand(len(PERMS), N), PERMS.to(device))  # (24,)
    assert math.isclose(log_p.exp().sum().item(), 1.0, rel_tol=1e-12)
    (exact,) = torch.autograd.grad((log_p.exp() * table).sum(), leaf)
    return keys, table, exact


def _pl_estimates(layer, keys, table, instances: int, samples: int) -> torch.Tensor:
    """Per-instance gradient estimates ``(instances, n)`` of one training step of ``layer``."""
    leaf = keys.expand(instances, N).clone().requires_grad_()
    out = layer.train()(repeat_samples(leaf, samples))  # (S * b, n, n)
    loss = table[_perm_index(out.matrix.argmax(-1))]  # (S * b,)
    layer.objective(loss).backward()
    return leaf.grad * instances  # the objective averages over instances


@pytest.mark.parametrize("device", DEVICES)
def test_rloo_plackett_luce_is_unbiased_and_beats_reinforce(device):
    keys, table, exact = _pl_problem(device)
    torch.manual_seed(0)
    b = 20_000
    spec = PermutationSpec(n=N, source="keys")
    rloo = _pl_estimates(RlooPlackettLuceLayer(spec, samples=SAMPLES).to(device), keys, table, b, SAMPLES)
    assert _report("rloo, Plackett-Luce n=4", rloo.mean(0), exact, rloo.std(0) / b**0.5) < Z
    # plain REINFORCE (no baseline) averaged over the same number of samples per instance
    single = _pl_estimates(PlackettLuceLayer(spec, baseline="none").to(device), keys, table, SAMPLES * b, 1)
    plain = single.view(SAMPLES, b, N).mean(0)
    assert _report("reinforce, Plackett-Luce n=4", plain.mean(0), exact, plain.std(0) / b**0.5) < Z
    var_rloo, var_plain = rloo.var(0).sum().item(), plain.var(0).sum().item()
    print(f"total variance per instance, S = {SAMPLES}: rloo {var_rloo:.4g}, reinforce without "
          f"baseline {var_plain:.4g} (ratio {var_plain / var_rloo:.1f})")
    assert var_rloo < var_plain


# ---- a 3 x 3 sparse matrix of 2 tuples -----------------------------------------------------------

MATRIX = SparseMatrixSpec(in_shape=(3,), out_shape=(3,), k=2)
X = [1.0, -2.0, 0.5]


def _dense_loss(draws: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``mean((W x - x)^2)`` with ``W[o, i]`` the number of tuples ``(o, i)`` in each draw
    ``(m, k, 2)``; a dense reference, independent of the sparse product the layers use."""
    w = torch.zeros(draws.shape[0], 3, 3, dtype=x.dtype, device=x.device)
    for t in range(draws.shape[1]):
        w[torch.arange(len(w)), draws[:, t, 0], draws[:, t, 1]] += 1.0
    return ((w @ x - x) ** 2).mean(-1)


def _matrix_exact(layer: ReinforceMatrixLayer, x: torch.Tensor) -> list[torch.Tensor]:
    """The gradient of the expected loss in ``means_raw`` and ``sigmas_raw``, summing over all
    81 pairs of integer tuples with their discretised Gaussian probabilities."""
    cells = torch.tensor(list(itertools.product(range(3), range(3))), device=x.device)  # (9, 2)
    draws = torch.stack([torch.stack(pair) for pair in itertools.product(cells, repeat=2)])
    log_p = discretised_log_prob(draws, layer.means(), layer.sigmas(), layer.shape).sum(-1)  # (81,)
    assert math.isclose(log_p.exp().sum().item(), 1.0, rel_tol=1e-9)
    expected = (log_p.exp() * _dense_loss(draws, x)).sum()
    return list(torch.autograd.grad(expected, [layer.means_raw, layer.sigmas_raw]))


def _matrix_estimates(layer, x, batches: int, instances: int, samples: int) -> torch.Tensor:
    """One gradient estimate (means_raw and sigmas_raw, flat) per batch of ``instances``."""
    out = []
    rows = repeat_samples(x.expand(instances, 3), samples)
    for _ in range(batches):
        layer.zero_grad()
        y = layer.train()(rows)
        layer.objective(((y - rows) ** 2).mean(-1)).backward()
        out.append(torch.cat([layer.means_raw.grad.flatten(), layer.sigmas_raw.grad.flatten()]))
    return torch.stack(out)


@pytest.mark.parametrize("device", DEVICES)
def test_rloo_sparse_matrix_is_unbiased_and_beats_reinforce(device):
    torch.manual_seed(3)
    rloo = RlooMatrixLayer(MATRIX, samples=SAMPLES, fix_values=True).to(device).double()
    x = torch.tensor(X, dtype=torch.float64, device=device)
    exact = torch.cat([g.flatten() for g in _matrix_exact(rloo, x)])
    batches, b = 200, 500
    est = _matrix_estimates(rloo, x, batches, b, SAMPLES)
    assert _report("rloo, 3x3 sparse matrix", est.mean(0), exact, est.std(0) / batches**0.5) < Z
    plain = ReinforceMatrixLayer(MATRIX, baseline="none", fix_values=True).to(device).double()
    plain.load_state_dict(rloo.state_dict(), strict=False)
    single = _matrix_estimates(plain, x, batches, SAMPLES * b, 1)
    assert _report("reinforce, 3x3 sparse matrix", single.mean(0), exact,
                   single.std(0) / batches**0.5) < Z
    var_rloo, var_plain = est.var(0).sum().item(), single.var(0).sum().item()
    print(f"total variance of a batch estimate ({b} instances x S = {SAMPLES}): rloo "
          f"{var_rloo:.4g}, reinforce without baseline over {SAMPLES * b} instances "
          f"{var_plain:.4g} (ratio {var_plain / var_rloo:.1f})")
    assert var_rloo < var_plain


# ---- a one-pixel glimpse of a 3 x 3 image ---------------------------------------------------------

GLIMPSE = GlimpseSpec(image_shape=(1, 3, 3), size=1, glimpses=1)


def _pixel_probabilities(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """P(read-out row = 0, 1, 2) for a centre ``z ~ N(mean, var)`` in logit space: the pixel is
    ``round(2 sigmoid(z))``, so the cell edges are ``logit(1/4)`` and ``logit(3/4)``."""
    edge = math.log(3.0)  # logit(3/4) = -logit(1/4)
    cdf = torch.special.ndtr((torch.stack([-edge * torch.ones_like(mean), edge * torch.ones_like(mean)])
                              - mean) / var.sqrt())  # (2,)
    return torch.stack([cdf[0], cdf[1] - cdf[0], 1 - cdf[1]])


def _glimpse_exact(layer: RlooGlimpse, boxes: torch.Tensor, image: torch.Tensor,
                   target: float) -> torch.Tensor:
    """The gradient of the expected loss ``(pixel - target)^2`` in the raw box and ``log_std``:
    the one read-out point is the centre of the two corners, a Gaussian per axis."""
    mean = layer.corners(boxes)[0, 0]  # (4,): y0, x0, y1, x1
    var = (2 * layer.log_std[0]).exp()  # (4,)
    rows = _pixel_probabilities((mean[0] + mean[2]) / 2, (var[0] + var[2]) / 4)
    cols = _pixel_probabilities((mean[1] + mean[3]) / 2, (var[1] + var[3]) / 4)
    expected = (rows[:, None] * cols[None, :] * (image[0] - target) ** 2).sum()
    grads = torch.autograd.grad(expected, [boxes, layer.log_std])
    return torch.cat([g.flatten() for g in grads])


@pytest.mark.parametrize("device", DEVICES)
def test_rloo_glimpse_is_unbiased(device):
    torch.manual_seed(5)
    layer = RlooGlimpse(GLIMPSE, samples=SAMPLES, std=0.8).to(device).double()
    image = torch.rand(1, 3, 3, dtype=torch.float64, device=device)
    boxes = torch.tensor([[[0.3, -0.6, 0.1, 0.4]]], dtype=torch.float64, device=device,
                         requires_grad=True)  # (1, g, 4) raw source outputs
    target = 0.5
    exact = _glimpse_exact(layer, boxes, image, target)
    batches, b = 200, 500
    estimates = []
    for _ in range(batches):
        layer.zero_grad()
        leaf = boxes.detach().expand(b, 1, 4).clone().requires_grad_()
        images = repeat_samples(image.expand(b, 1, 3, 3), SAMPLES)
        read = layer.train()(images, repeat_samples(leaf, SAMPLES))  # (S * b, 1, 1, 1, 1)
        layer.objective((read.flatten(1).squeeze(1) - target) ** 2).backward()
        estimates.append(torch.cat([leaf.grad.sum(0).flatten(), layer.log_std.grad.flatten()]))
    est = torch.stack(estimates)
    assert _report("rloo, one-pixel glimpse of 3x3", est.mean(0), exact,
                   est.std(0) / batches**0.5) < Z


def test_rloo_conforms():
    assert_conforms(RlooEstimator(), train=False)


def test_rloo_needs_two_samples():
    with pytest.raises(ValueError, match="samples = 1: a leave-one-out baseline needs 2"):
        RlooEstimator().check({**RlooEstimator.defaults, "samples": 1})
    with pytest.raises(ValueError, match="samples must be >= 2"):
        RlooPlackettLuceLayer(PermutationSpec(n=3, source="keys"), samples=1)
