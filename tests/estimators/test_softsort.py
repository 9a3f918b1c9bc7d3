"""The ``softsort`` estimator (Prillo and Eisenschlos 2020): its relaxation against a loop-by-loop
reference, its gradient, its limits and its layer contract."""

from __future__ import annotations

import math

import pytest
import torch

from estimators.base import PermutationSpec
from estimators.plugins.softsort import SoftSortLayer, softsort
from estimators.shared.neuralsort import sort_matrix
from harness.testing import DEVICES, assert_conforms


def reference(keys: list[float], tau: float) -> list[list[float]]:
    """Eq. 1 entry by entry, ascending: ``P[i][j] ~ exp(-|s_(i) - s_j| / tau)`` with ``s_(i)`` the
    ``i``-th smallest key, each row normalised."""
    ordered = sorted(keys)
    rows = []
    for s_i in ordered:
        weights = [math.exp(-abs(s_i - s_j) / tau) for s_j in keys]
        rows.append([w / sum(weights) for w in weights])
    return rows


@pytest.mark.parametrize("device", DEVICES)
def test_softsort_matches_the_entrywise_reference_and_rows_sum_to_one(device):
    keys = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = softsort(keys.to(device), tau=0.7)
    expected = torch.tensor([reference(row.tolist(), 0.7) for row in keys], dtype=torch.float64)
    assert torch.allclose(out.cpu(), expected, atol=1e-12)
    assert torch.allclose(out.sum(-1), torch.ones(4, 5, dtype=torch.float64, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_softsort_gradcheck(device):
    keys = torch.randn(2, 5, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda k: softsort(k, tau=0.5), (keys,))


@pytest.mark.parametrize("device", DEVICES)
def test_softsort_tends_to_the_sort_matrix_as_tau_goes_to_zero(device):
    keys = torch.tensor([[0.3, -1.2, 0.9, 0.1], [2.0, 1.0, -1.0, 0.5]], device=device)
    hard = sort_matrix(keys)
    errors = [(softsort(keys, tau=tau) - hard).abs().max().item() for tau in (1.0, 0.1, 0.01)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_hard_softsort_is_the_sort_forward_with_the_soft_gradient(device):
    keys = torch.randn(3, 6, device=device, requires_grad=True)
    weights = torch.randn(3, 6, 6, device=device)
    hard = softsort(keys, tau=0.5, hard=True)
    assert torch.allclose(hard.detach(), sort_matrix(keys.detach()), atol=1e-6)  # P + s - s
    (g_hard,) = torch.autograd.grad((hard * weights).sum(), keys)
    (g_soft,) = torch.autograd.grad((softsort(keys, tau=0.5) * weights).sum(), keys)
    assert torch.allclose(g_hard, g_soft)


@pytest.mark.parametrize("device", DEVICES)
def test_softsort_layer_relaxes_in_training_and_sorts_in_eval(device):
    layer = SoftSortLayer(PermutationSpec(n=4, source="keys"), tau=0.5).to(device)
    keys = torch.randn(5, 4, device=device)
    assert torch.allclose(layer(keys).matrix, softsort(keys, tau=0.5))
    assert torch.equal(layer.eval()(keys).matrix, sort_matrix(keys))
    with pytest.raises(ValueError, match="no free"):
        SoftSortLayer(PermutationSpec(n=4, source="free"))


def test_softsort_conforms():
    assert assert_conforms("softsort").ok
