"""The ``perturbed`` estimator (Berthet et al. 2020) against exact references.

Its forward is a Monte-Carlo mean of the hard solution under Gaussian noise and its backward an
unbiased Monte-Carlo estimate of that mean's Jacobian, so at many samples both must meet the
exactly integrated expectation (``exact.gaussian_*``) and its finite-difference gradient within
Monte-Carlo error (5 standard errors).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from estimators.base import PermutationSpec, SparseMatrixSpec
from estimators.plugins.perturbed import PerturbedMatrixLayer, PerturbedSortLayer, _sort, perturbed
from estimators.shared.neuralsort import sort_matrix
from estimators.shared.perturb import topk_mask
from harness.testing import DEVICES, assert_conforms

SIGMA = 0.5
KEYS = np.array([0.3, -0.1, 0.2])  # n = 3, close enough that every order is likely
SCORES = np.array([0.4, -0.2, 0.1, 0.9, 0.0, -0.5, 0.3, 0.2, -0.1])  # a 3 x 3 matrix's entries
K = 3


def _draws(theta: np.ndarray, oracle, samples: int, device: str, seed: int = 0):
    """The estimator's forward and vector-Jacobian product for a random cotangent ``g``, and the
    per-draw VJP terms ``<y_m, g> Z_m / sigma`` (recomputed from the same noise) for their spread."""
    gen = torch.Generator(device=device).manual_seed(seed)
    t = torch.tensor(theta, dtype=torch.float64, device=device).unsqueeze(0).requires_grad_()
    out = perturbed(t, oracle, samples, SIGMA, generator=gen)[0]
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (vjp,) = torch.autograd.grad(out, t, g.to(device))
    noise = torch.randn((samples, *t.shape), generator=gen.manual_seed(seed), device=device, dtype=t.dtype)
    hard = oracle(t.detach() + SIGMA * noise)[:, 0]  # (M, *event)
    terms = (hard * g.to(device)).flatten(1).sum(1, keepdim=True) * noise[:, 0] / SIGMA  # (M, d)
    return out.detach().cpu().numpy(), vjp[0].cpu().numpy(), terms.cpu().numpy(), g.numpy()


@pytest.mark.parametrize("device", DEVICES)
def test_perturbed_sort_matches_the_integrated_expectation_and_its_gradient(device, exact):
    samples = 200_000
    mean, vjp, terms, g = _draws(KEYS, _sort, samples, device)
    reference = exact.gaussian_sort_mean(KEYS, SIGMA)
    assert np.abs(mean - reference).max() < 5 * np.sqrt(0.25 / samples)
    assert np.allclose(vjp, terms.mean(0), atol=1e-9)  # autograd computes the identity's mean
    grad = exact.central_difference(lambda k: (exact.gaussian_sort_mean(k, SIGMA) * g).sum(), KEYS)
    stderr = terms.std(0) / np.sqrt(samples)
    assert np.all(np.abs(vjp - grad) < 5 * stderr + 1e-4), (vjp, grad, stderr)


@pytest.mark.parametrize("device", DEVICES)
def test_perturbed_topk_matches_the_integrated_expectation_and_its_gradient(device, exact):
    samples = 200_000
    mean, vjp, terms, g = _draws(SCORES, lambda s: topk_mask(s, K), samples, device)
    reference = exact.gaussian_topk_mean(SCORES, K, SIGMA)
    assert np.abs(reference.sum() - K) < 1e-6
    assert np.abs(mean - reference).max() < 5 * np.sqrt(0.25 / samples)
    assert np.allclose(vjp, terms.mean(0), atol=1e-9)
    grad = exact.central_difference(lambda s: (exact.gaussian_topk_mean(s, K, SIGMA) * g).sum(), SCORES)
    stderr = terms.std(0) / np.sqrt(samples)
    assert np.all(np.abs(vjp - grad) < 5 * stderr + 1e-4), (vjp, grad, stderr)


@pytest.mark.parametrize("device", DEVICES)
def test_perturbed_layers_are_hard_and_unperturbed_in_eval(device):
    torch.manual_seed(0)
    matrix = PerturbedMatrixLayer(SparseMatrixSpec((3,), (3,), k=K)).to(device).eval()
    w = matrix(torch.eye(3, device=device)).T  # column j = W e_j
    mask = topk_mask(matrix.matrix.scores.detach(), K).view(3, 3)
    assert torch.equal(w, mask * matrix.matrix.values.detach().view(3, 3))
    sort = PerturbedSortLayer(PermutationSpec(n=4, source="keys")).to(device).eval()
    keys = torch.randn(5, 4, device=device)
    assert torch.equal(sort(keys).matrix, sort_matrix(keys))


@pytest.mark.parametrize("device", DEVICES)
def test_a_free_perturbed_permutation_learns_the_identity(device, exact):
    """Free keys, loss ``|P x - x|^2``: the estimator's gradient must sort the keys ascending."""
    torch.manual_seed(0)
    layer = PerturbedSortLayer(PermutationSpec(n=4, source="free"), samples=50, sigma=0.5).to(device)
    assert torch.equal(exact.free_sort_after_training(layer, device), torch.eye(4, device=device))


def test_perturbed_conforms():
    assert assert_conforms("perturbed").ok
