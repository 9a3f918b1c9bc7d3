"""The gradient study: the listed distributions (``StructureLayer.outcomes``) against the layers' own
sampling, their exact gradients against finite differences (gradcheck, float64), and the study's
numbers on REINFORCE (unbiased, variance falling like 1/S) and on a relaxation (marked, no bias)."""

from __future__ import annotations

import pytest
import torch

from estimators.base import PermutationSpec, SparseMatrixSpec
from estimators.plugins.dense import DenseEstimator
from estimators.plugins.reinforce import ReinforceEstimator
from estimators.shared.plackett_luce import plackett_luce_sample
from harness.task import CellSetup
from plugins.gradient_study import MatrixStudy, PermutationStudy

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
]
REINFORCE = ReinforceEstimator()


@pytest.mark.parametrize("device", DEVICES)
def test_the_listed_tuples_are_what_the_reinforce_matrix_layer_draws(device):
    torch.manual_seed(0)
    layer = REINFORCE.build(SparseMatrixSpec((3,), (3,), 2), dict(REINFORCE.defaults)).to(device)
    layer.train()
    out = layer.outcomes()
    p = out.log_probs.exp()
    assert out.structures.shape == (81, 3, 3)
    assert float(p.sum().detach()) == pytest.approx(1.0, abs=1e-5)
    x = torch.tensor([[1.0, -2.0, 0.5]], device=device)
    exact = (p[:, None] * (out.structures @ x[0])).sum(0)  # E[W x] over the listed draws
    draws = 40_000
    with torch.no_grad():
        sampled = layer(x.expand(draws, 3))  # one structure per instance
    sem = sampled.std(0) / draws**0.5
    assert torch.all((sampled.mean(0) - exact).abs() <= 5 * sem + 1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_the_listed_orderings_are_what_plackett_luce_draws(device):
    layer = REINFORCE.build(PermutationSpec(4, "keys"), dict(REINFORCE.defaults)).to(device)
    keys = torch.tensor([[0.3, -1.0, 0.8, 0.0]], device=device)
    out = layer.outcomes(keys)
    p = out.log_probs.exp()
    assert float(p.sum().detach()) == pytest.approx(1.0, abs=1e-6)
    draws = 40_000
    perms = plackett_luce_sample(keys.expand(draws, 4), generator=torch.Generator(device).manual_seed(1))
    matrices = torch.nn.functional.one_hot(perms, 4).float()
    freq = (matrices[:, None] == out.structures[None]).all(-1).all(-1).float().mean(0)  # (24,)
    sem = (p * (1 - p) / draws).sqrt()
    assert torch.all((freq - p).abs() <= 5 * sem + 1e-4)


def test_the_exact_expected_loss_has_the_gradient_finite_differences_give():
    torch.manual_seed(0)
    layer = REINFORCE.build(SparseMatrixSpec((2,), (2,), 2), dict(REINFORCE.defaults)).double()
    x = torch.tensor([0.7, -1.3], dtype=torch.float64)

    def expected(means_raw, sigmas_raw):
        with torch.no_grad():
            layer.means_raw.copy_(means_raw)
            layer.sigmas_raw.copy_(sigmas_raw)
        out = layer.outcomes()
        return (out.log_probs.exp() * ((out.structures @ x - x) ** 2).mean(-1)).sum()

    means, sigmas = layer.means_raw.detach().clone(), layer.sigmas_raw.detach().clone()
    out = layer.outcomes()
    value = (out.log_probs.exp() * ((out.structures @ x - x) ** 2).mean(-1)).sum()
    analytic = torch.autograd.grad(value, [layer.means_raw])[0]
    eps = 1e-6
    numeric = torch.zeros_like(means)
    for i in range(means.numel()):
        step = torch.zeros_like(means).view(-1)
        step[i] = eps
        up = expected(means + step.view_as(means), sigmas)
        down = expected(means - step.view_as(means), sigmas)
        numeric.view(-1)[i] = (up - down) / (2 * eps)
    assert torch.allclose(analytic, numeric, atol=1e-6, rtol=1e-5)


def _study(task, est, params, tmp_path, **extra):
    p = {**task.defaults, **extra}
    kind = task.kinds[0]
    spec = task.spec(kind, p)
    torch.manual_seed(0)
    layer = est.build(spec, {**est.defaults, **params})
    run = task.setup(CellSetup(p, layer, kind, torch.device("cpu"), 0, tmp_path, spec))
    assert run.evaluate() == {}  # before its step: nothing computed yet
    run.train_step(0)
    return run.evaluate()


def test_reinforce_is_unbiased_and_its_variance_falls_like_one_over_s(tmp_path):
    found = _study(PermutationStudy(), REINFORCE, {}, tmp_path, n=4, draws=300, samples=[1, 16])
    assert found["test/declared"] == 1.0
    assert found["test/bias2_s16"] < 0.05 * found["test/var_s16"] + 1e-3  # bias within its noise
    assert 8 < found["test/var_s1"] / found["test/var_s16"] < 32  # 16x fewer: 1/S
    assert found["test/cos_s16"] > 0.9
    assert found["test/mse_s1"] == pytest.approx(found["test/var_s1"] + found["test/bias2_s1"])


def test_reinforce_on_the_matrix_agrees_with_its_listed_gradient(tmp_path):
    found = _study(MatrixStudy(), REINFORCE, {}, tmp_path, n=2, k=2, draws=300, samples=[16])
    assert found["test/declared"] == 1.0 and found["test/cos_s16"] > 0.9


def test_a_relaxation_without_a_distribution_is_marked_and_shows_its_variance(tmp_path):
    found = _study(PermutationStudy(), DenseEstimator(), {"tau": 0.3}, tmp_path, n=3, draws=5, samples=[1])
    assert found["test/declared"] == 0.0
    assert found["test/var_s1"] == 0.0  # deterministic: every estimate the same
    assert "test/bias2_s1" not in found and "test/mse_s1" not in found


def test_the_study_sizes_are_checked():
    with pytest.raises(ValueError, match="n <= 5"):
        PermutationStudy().check({**PermutationStudy.defaults, "n": 6})
    with pytest.raises(ValueError, match="at most 20,000"):
        MatrixStudy().check({**MatrixStudy.defaults, "n": 4, "k": 4})
