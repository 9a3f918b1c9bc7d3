"""The gradient study: the listed distributions (``StructureLayer.outcomes``) against the layers' own
sampling, their exact gradients against finite differences (gradcheck, float64), and the study's
numbers on REINFORCE and rloo (unbiased, variance falling with S, rloo as S samples of one
instance), on stochastic NeuralSort (bias growing with its temperature), on the glimpse, and on a
relaxation (marked, no bias)."""

from __future__ import annotations

import pytest
import torch

from estimators.base import GlimpseSpec, PermutationSpec, SparseMatrixSpec
from estimators.plugins.bilinear import BilinearEstimator
from estimators.plugins.dense import DenseEstimator
from estimators.plugins.imle import ImleEstimator
from estimators.plugins.reinforce import ReinforceEstimator
from estimators.plugins.rloo import RlooEstimator
from estimators.plugins.sparse import SparseEstimator
from estimators.shared.plackett_luce import plackett_luce_sample
from harness.task import CellSetup
from plugins.gradient_study import GlimpseStudy, MatrixStudy, PermutationStudy

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
]
REINFORCE = ReinforceEstimator()
RLOO = RlooEstimator()
KEYS4 = PermutationSpec(4, "keys")
DRAWS = 40_000


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


# ---- several samples per instance, and the new layers' distributions ----------------------------


def test_rloo_is_studied_as_s_samples_of_one_instance_unbiased_and_its_variance_falls(tmp_path):
    """An rloo estimate from S samples is one instance drawn S times with the leave-one-out
    baseline among them: unbiased against the listed gradient, variance falling with S, and no
    estimate from one sample (its baseline needs two)."""
    found = _study(PermutationStudy(), RLOO, {}, tmp_path, n=4, draws=300, samples=[1, 4, 16])
    assert found["test/declared"] == 1.0
    assert "test/var_s1" not in found and "test/bias2_s1" not in found
    assert found["test/var"] == found["test/var_s16"]  # the primary metric: the largest S, always there
    for s in (4, 16):
        assert found[f"test/bias2_s{s}"] < 0.05 * found[f"test/var_s{s}"] + 1e-3  # within its noise
    assert 2 < found["test/var_s4"] / found["test/var_s16"] < 8  # about 4x fewer: (S - 1) / S^2-ish
    assert found["test/cos_s16"] > 0.95


def test_rloo_on_the_glimpse_agrees_with_its_listed_gradient(tmp_path):
    found = _study(GlimpseStudy(), RLOO, {}, tmp_path, draws=400, samples=[16])
    assert found["test/declared"] == 1.0 and found["test/cos_s16"] > 0.8
    assert found["test/bias2_s16"] < 0.05 * found["test/var_s16"] + 1e-3


@pytest.mark.parametrize("device", DEVICES)
def test_stochastic_neuralsort_lists_the_plackett_luce_law_its_hard_limit_draws(device):
    layer = DenseEstimator().build(KEYS4, {**DenseEstimator.defaults, "tau": 1e-4, "gumbel_samples": 1})
    layer.to(device).train()
    keys = torch.tensor([[0.3, -1.0, 0.8, 0.0]], device=device)
    with torch.no_grad():
        drawn = layer(keys.expand(DRAWS, 4)).matrix.round()  # tau -> 0: the hard sort of keys - G
    _assert_frequencies(drawn, layer.outcomes(keys))
    assert DenseEstimator().build(KEYS4, dict(DenseEstimator.defaults)).outcomes(keys) is None


@pytest.mark.parametrize("device", DEVICES)
def test_imle_sort_lists_the_law_of_its_perturb_and_map_states(device):
    layer = ImleEstimator().build(KEYS4, {**ImleEstimator.defaults, "tau": 0.7}).to(device).train()
    keys = torch.tensor([[0.3, -1.0, 0.8, 0.0]], device=device)
    with torch.no_grad():
        drawn = layer(keys.expand(DRAWS, 4)).matrix
    _assert_frequencies(drawn, layer.outcomes(keys))


@pytest.mark.parametrize("device", DEVICES)
def test_the_listed_glimpse_reads_are_what_the_reinforce_glimpse_reads(device):
    spec = GlimpseSpec(image_shape=(1, 3, 4), size=1, glimpses=2)
    layer = REINFORCE.build(spec, {**REINFORCE.defaults, "std": 0.8}).to(device).train()
    image = torch.arange(12.0, device=device).view(1, 1, 3, 4)  # each pixel its own value
    boxes = torch.tensor([[[0.3, -0.6, 0.1, 0.4], [-1.0, 0.5, 0.2, 0.0]]], device=device)
    out = layer.outcomes(image, boxes)
    assert out.structures.shape == (144, 2, 1, 1, 2)
    p = out.log_probs.exp()
    assert float(p.sum().detach()) == pytest.approx(1.0, abs=1e-5)
    with torch.no_grad():
        read = layer(image.expand(DRAWS, -1, -1, -1), boxes.expand(DRAWS, -1, -1)).flatten(1)  # (D, 2)
    listed = (out.structures[..., 0] * 4 + out.structures[..., 1]).flatten(1).float()  # (m, 2)
    freq = (read[:, None] == listed[None]).all(-1).float().mean(0)
    sem = (p * (1 - p) / DRAWS).sqrt()
    assert torch.all((freq - p).abs() <= 5 * sem + 1e-4)
    assert layer.__class__(GlimpseSpec((1, 3, 3), size=2, glimpses=1)).outcomes(image, boxes[:, :1]) is None


def test_the_listed_glimpse_gradient_matches_finite_differences():
    """gradcheck in float64 of the expected loss from the listed reads, in the raw box."""
    layer = REINFORCE.build(GlimpseSpec((1, 3, 3), size=1, glimpses=1), dict(REINFORCE.defaults)).double()
    image = torch.rand(1, 1, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[[0.3, -0.6, 0.1, 0.4]]], dtype=torch.float64, requires_grad=True)

    def expected(box: torch.Tensor) -> torch.Tensor:
        out = layer.outcomes(image, box)
        pix = image[0, 0, out.structures[..., 0], out.structures[..., 1]].flatten(1).mean(-1)
        return (out.log_probs.exp() * (pix - 0.5) ** 2).sum()

    assert torch.autograd.gradcheck(expected, (boxes,))


def test_stochastic_neuralsort_bias_grows_with_its_temperature(tmp_path):
    found = {
        tau: _study(PermutationStudy(), DenseEstimator(), {"tau": tau, "gumbel_samples": 1}, tmp_path,
                    n=4, draws=200, samples=[16])
        for tau in (0.1, 3.0)
    }
    assert all(f["test/declared"] == 1.0 for f in found.values())
    assert found[3.0]["test/bias2_s16"] > 10 * found[0.1]["test/bias2_s16"] + 1e-3


@pytest.mark.parametrize("estimator", ["sparse", "bilinear", "dense"])
def test_glimpse_layers_without_a_listed_law_are_marked(tmp_path, estimator):
    est = {"sparse": SparseEstimator(), "bilinear": BilinearEstimator(), "dense": DenseEstimator()}[estimator]
    found = _study(GlimpseStudy(), est, {}, tmp_path, draws=5, samples=[1, 4])
    assert found["test/declared"] == 0.0 and "test/bias2_s1" not in found
    assert found["test/var_s1"] >= 0 and found["test/var_s4"] >= 0


def _assert_frequencies(drawn: torch.Tensor, listed) -> None:
    p = listed.log_probs.exp()
    assert float(p.sum().detach()) == pytest.approx(1.0, abs=1e-5)
    freq = (drawn[:, None] == listed.structures[None]).all(-1).all(-1).float().mean(0)
    sem = (p * (1 - p) / DRAWS).sqrt()
    assert torch.all((freq - p).abs() <= 5 * sem + 1e-4)
