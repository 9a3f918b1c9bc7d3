"""The ``imle`` estimator (Niepert et al. 2021) against exact references.

I-MLE is biased by design: over the noise its expectation is the finite difference
``mu(theta) - mu(theta')`` of the perturb-and-MAP marginals at the target ``theta' = theta - lambda
g`` (the paper's Eq. 9), which is ``lambda`` times the exact gradient of ``<mu, g>`` only as
``lambda -> 0``. With Gumbel noise both sides are enumerable (``exact.gumbel_*``): the tests check
the finite-difference identity at a large ``lambda`` and the direction at a small one. Sum-of-Gamma
noise has no closed-form law; its test is the theorem that makes it the paper's choice.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from estimators.base import PermutationSpec, SparseMatrixSpec
from estimators.plugins.imle import ImleMatrixLayer, ImleSortLayer, imle_sort, imle_topk
from estimators.shared.neuralsort import sort_matrix
from estimators.shared.perturb import sum_of_gamma_noise, topk_mask
from estimators.shared.sinkhorn import gumbel_noise
from harness.testing import DEVICES, assert_conforms

SCORES = [0.4, -0.2, 0.1, 0.9, 0.0, -0.5, 0.3, 0.2, -0.1]  # a 3 x 3 matrix's entries
K = 3
KEYS = [0.3, -0.1, 0.2]


def _per_draw(fn, theta: list[float], lam: float, samples: int, device: str, scale: bool):
    """Per-draw I-MLE gradients ``(M, d)`` of ``<out, g>`` (one draw per row) and the cotangent."""
    torch.manual_seed(0)
    t = torch.tensor(theta, dtype=torch.float64, device=device).repeat(samples, 1).requires_grad_()
    noise = gumbel_noise((1, *t.shape), device=device, dtype=t.dtype)
    out = fn(t, noise, lam, scale)  # (M, *event)
    g = torch.randn(out.shape[1:], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (grad,) = torch.autograd.grad(out, t, g.to(device).expand_as(out))
    return grad.cpu().numpy(), g


def _topk(t, noise, lam, scale):
    return imle_topk(t, noise, K, lam, scale)


@pytest.mark.parametrize("device", DEVICES)
def test_imle_topk_expectation_is_the_finite_difference_of_the_marginals(device, exact):
    lam, samples = 1.0, 100_000
    draws, g = _per_draw(_topk, SCORES, lam, samples, device, scale=False)
    theta = torch.tensor(SCORES, dtype=torch.float64)
    reference = (exact.gumbel_topk_mean(theta, K) - exact.gumbel_topk_mean(theta - lam * g, K)).numpy()
    stderr = draws.std(0) / math.sqrt(samples)
    assert np.all(np.abs(draws.mean(0) - reference) < 5 * stderr + 1e-4), (draws.mean(0), reference)


@pytest.mark.parametrize("device", DEVICES)
def test_imle_topk_points_along_the_exact_gradient_at_small_lambda(device, exact):
    draws, g = _per_draw(_topk, SCORES, 0.05, 100_000, device, scale=True)
    theta = torch.tensor(SCORES, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad((exact.gumbel_topk_mean(theta, K) * g).sum(), theta)
    estimate = draws.mean(0)
    assert exact.cosine(estimate, grad.numpy()) > 0.99
    assert np.linalg.norm(estimate - grad.numpy()) < 0.15 * np.linalg.norm(grad.numpy())


@pytest.mark.parametrize("device", DEVICES)
def test_imle_sort_points_along_the_exact_gradient_at_small_lambda(device, exact):
    """Gumbel keys: the forward is a Plackett-Luce sample, the target's MAP the Hungarian solution."""
    draws, g = _per_draw(imle_sort, KEYS, 0.05, 50_000, device, scale=True)
    keys = torch.tensor(KEYS, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad((exact.gumbel_sort_mean(keys) * g).sum(), keys)
    estimate = draws.mean(0)
    assert exact.cosine(estimate, grad.numpy()) > 0.99
    assert np.linalg.norm(estimate - grad.numpy()) < 0.15 * np.linalg.norm(grad.numpy())


@pytest.mark.parametrize("device", DEVICES)
def test_imle_sort_forward_is_a_plackett_luce_sample(device, exact):
    torch.manual_seed(0)
    keys = torch.tensor(KEYS, dtype=torch.float64, device=device).repeat(100_000, 1)
    out = imle_sort(keys, gumbel_noise((1, *keys.shape), device=device, dtype=keys.dtype), 1.0)
    reference = exact.gumbel_sort_mean(torch.tensor(KEYS, dtype=torch.float64)).numpy()
    assert np.abs(out.mean(0).cpu().numpy() - reference).max() < 5 * math.sqrt(0.25 / 100_000)


def test_sum_of_gamma_noise_sums_to_the_truncated_gumbel():
    """Niepert et al. Thm. 1: ``k`` draws sum to ``sum_{i<=s} Exp(i) - log s`` (Gumbel as ``s -> inf``),
    so the sum's mean is ``H_s - log s`` and its variance ``sum_{i<=s} 1/i^2``."""
    torch.manual_seed(0)
    k, s, n = 4, 10, 200_000
    total = sum_of_gamma_noise((n, k), k, torch.zeros((), dtype=torch.float64), iterations=s).sum(-1)
    mean = sum(1 / i for i in range(1, s + 1)) - math.log(s)
    var = sum(1 / i**2 for i in range(1, s + 1))
    assert abs(total.mean().item() - mean) < 5 * math.sqrt(var / n)
    assert abs(total.var().item() - var) < 0.05 * var


@pytest.mark.parametrize("device", DEVICES)
def test_imle_layers_are_hard_in_training_and_unperturbed_in_eval(device):
    torch.manual_seed(0)
    matrix = ImleMatrixLayer(SparseMatrixSpec((3,), (3,), k=K)).to(device)
    x = torch.randn(5, 3, device=device)
    assert matrix(x).shape == (5, 3)
    matrix.eval()
    w = matrix(torch.eye(3, device=device)).T
    mask = topk_mask(matrix.matrix.scores.detach(), K).view(3, 3)
    assert torch.equal(w, mask * matrix.matrix.values.detach().view(3, 3))
    sort = ImleSortLayer(PermutationSpec(n=4, source="keys")).to(device)
    keys = torch.randn(5, 4, device=device)
    soft = sort(keys).matrix
    assert torch.equal(soft.sum(-1), torch.ones(5, 4, device=device))
    assert set(soft.unique().tolist()) <= {0, 1}  # one sample: a hard permutation
    assert torch.equal(sort.eval()(keys).matrix, sort_matrix(keys))


@pytest.mark.parametrize("device", DEVICES)
def test_a_free_imle_permutation_learns_the_identity(device, exact):
    torch.manual_seed(0)
    layer = ImleSortLayer(PermutationSpec(n=4, source="free"), tau=0.5).to(device)
    assert torch.equal(exact.free_sort_after_training(layer, device), torch.eye(4, device=device))


def test_imle_conforms():
    assert assert_conforms("imle").ok
