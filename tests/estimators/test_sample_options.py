"""The several-sample options of existing estimators: stochastic NeuralSort (Grover et al. 2019)
in ``dense`` and Mena et al.'s ``n_s`` Gumbel samples in ``gumbel_sinkhorn``."""

from __future__ import annotations

import itertools

import pytest
import torch

from estimators.base import PermutationSpec, SparseMatrixSpec, repeat_samples, training_samples
from estimators.plugins.dense import DenseEstimator, NeuralSortLayer
from estimators.plugins.gumbel_sinkhorn import GumbelSinkhornEstimator, GumbelSinkhornLayer
from estimators.plugins.imle import ImleEstimator
from estimators.plugins.perturbed import PerturbedEstimator
from estimators.shared.neuralsort import sort_matrix
from estimators.shared.plackett_luce import plackett_luce_log_prob
from harness.testing import DEVICES, assert_conforms
from plugins.sorting_literature import method_of

KEYS = PermutationSpec(n=3, source="keys")


def _with(est_cls, **params):
    return type(est_cls.__name__, (est_cls,), {"defaults": {**est_cls.defaults, **params}})()


@pytest.mark.parametrize(
    "est", [_with(DenseEstimator, gumbel_samples=5), _with(GumbelSinkhornEstimator, samples=5)],
    ids=["stochastic-neuralsort", "gumbel-sinkhorn-n_s"],
)
def test_the_options_conform(est):
    assert_conforms(est, train=False)


@pytest.mark.parametrize("device", DEVICES)
def test_stochastic_neuralsort_is_smooth_in_the_keys_for_fixed_noise(device):
    layer = NeuralSortLayer(PermutationSpec(n=4, source="keys"), tau=0.7, gumbel_samples=3).train()
    keys = torch.randn(2, 4, dtype=torch.float64, device=device, requires_grad=True)

    def relaxed(k: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator(device=device).manual_seed(5)  # the same noise every call
        return layer(k, generator=generator).matrix

    assert not torch.equal(relaxed(keys), NeuralSortLayer(PermutationSpec(n=4, source="keys"),
                                                          tau=0.7).train()(keys).matrix)
    assert torch.autograd.gradcheck(relaxed, (keys,))


@pytest.mark.parametrize("device", DEVICES)
def test_stochastic_neuralsort_samples_plackett_luce_in_its_hard_limit(device):
    """At a small temperature each row sorts ``keys - G``: a Plackett-Luce sample of the keys
    (the distribution the reinforce estimator draws), checked against all 6 orderings of 3."""
    keys = torch.tensor([[0.4, -0.3, 0.9]], dtype=torch.float64, device=device)
    layer = NeuralSortLayer(KEYS, tau=1e-4, gumbel_samples=4).train()
    torch.manual_seed(0)
    draws = 40_000
    rows = repeat_samples(keys, draws)  # many samples of one instance
    order = layer(rows).matrix.argmax(-1)  # (draws, 3): item at each position
    perms = torch.tensor(list(itertools.permutations(range(3))), device=device)
    counts = (order[:, None, :] == perms[None]).all(-1).sum(0).double()  # (6,)
    exact = plackett_luce_log_prob(keys.expand(len(perms), 3), perms).exp()
    freq = counts / draws
    error = (exact * (1 - exact) / draws).sqrt()
    print(f"\nstochastic NeuralSort (tau = 1e-4) vs Plackett-Luce: max |freq - p| = "
          f"{(freq - exact).abs().max().item():.4f} ({((freq - exact).abs() / error).max().item():.2f} SE)")
    assert ((freq - exact).abs() < 5 * error).all()


def test_evaluation_ignores_the_noise_and_the_samples():
    keys = torch.tensor([[0.4, -0.3, 0.9], [2.0, 1.0, 0.0]])
    layer = NeuralSortLayer(KEYS, gumbel_samples=5).eval()
    assert layer.samples == 5
    torch.testing.assert_close(layer(keys).matrix, sort_matrix(keys))
    assert NeuralSortLayer(KEYS).samples == 1  # deterministic: one sample
    with pytest.raises(ValueError, match="gumbel_samples must be >= 0"):
        NeuralSortLayer(KEYS, gumbel_samples=-1)


@pytest.mark.parametrize("device", DEVICES)
def test_gumbel_sinkhorn_draws_its_own_noise_for_every_sample(device):
    spec = PermutationSpec(n=3, source="keys")
    layer = GumbelSinkhornLayer(spec, samples=3).train()
    assert layer.samples == 3
    scores = torch.randn(2, 3, 3, device=device)
    out = layer(repeat_samples(scores, 3)).matrix.view(3, 2, 3, 3)  # (S, b, n, n)
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[1], out[2])
    with pytest.raises(ValueError, match="samples must be > 0"):
        GumbelSinkhornLayer(spec, samples=0)


def test_the_neuralsort_table_names_stochastic_neuralsort_apart():
    import pandas as pd

    assert method_of(pd.Series({"estimator": "dense"})) == "Deterministic NeuralSort (ours)"
    assert method_of(pd.Series({"estimator": "dense", "params.estimator.gumbel_samples": "0"})) == (
        "Deterministic NeuralSort (ours)")
    assert method_of(pd.Series({"estimator": "dense", "params.estimator.gumbel_samples": "5"})) == (
        "Stochastic NeuralSort (ours)")
    assert method_of(pd.Series({"estimator": "rloo"})) == "rloo (ours)"


@pytest.mark.parametrize("est", ["perturbed", "imle"])
def test_internal_noise_draws_are_not_rows_per_instance(est):
    """perturbed and imle average ``samples`` noise draws inside one forward: a task must still
    feed every instance once (``training_samples`` is 1), not ``samples`` times over."""
    cls = {"perturbed": PerturbedEstimator, "imle": ImleEstimator}[est]
    for spec in (KEYS, SparseMatrixSpec((3,), (3,), 2)):
        layer = _with(cls, samples=7).build(spec, {**cls.defaults, "samples": 7}).train()
        assert layer.noise_samples == 7
        assert training_samples(layer) == 1
