"""The plugin's own tests: sparsebench's conformance suite, plus what only this estimator promises."""

from __future__ import annotations

import torch
from sparsebench_straight_through import StraightThrough
from sparsebench_straight_through.layers import StraightThroughMatrix, neuralsort, sort_matrix

from estimators.base import PermutationSpec, SparseMatrixSpec
from harness.testing import assert_conforms


def test_the_estimator_conforms(sparsebench_check):
    sparsebench_check(StraightThrough(), train=False)  # the layer checks only: a second or so


def test_the_installed_plugin_conforms():
    report = assert_conforms("straight_through")  # through the entry point, as check-plugin does
    assert any(c.name == "train on identity" for c in report.checks)


def test_forward_is_hard_and_backward_is_the_softmax_gradient():
    torch.manual_seed(0)
    layer = StraightThroughMatrix(SparseMatrixSpec((5,), (5,), k=5), tau=0.5)
    x = torch.randn(4, 5)
    w = layer.weight(4)
    assert set(w.detach().unique().tolist()) <= {0.0, 1.0} and (w.sum(-1) == 1).all()
    torch.manual_seed(1)
    (layer(x) ** 2).sum().backward()
    st = layer.logits.grad.clone()
    layer.logits.grad = None
    torch.manual_seed(1)  # the same Gumbel sample, differentiated through the softmax alone
    g = -torch.empty(4, 5, 5).exponential_().log()
    soft = ((layer.logits + g) / 0.5).softmax(-1)
    hard = torch.nn.functional.one_hot(soft.argmax(-1), 5).float()
    y = (hard + soft - soft.detach()) @ x.unsqueeze(-1)
    (y**2).sum().backward()
    torch.testing.assert_close(st, layer.logits.grad)


def test_neuralsort_approaches_the_hard_sort():
    keys = torch.tensor([[0.3, -1.0, 2.0, 0.5]])
    torch.testing.assert_close(neuralsort(keys, tau=1e-3), sort_matrix(keys))


def test_learns_the_identity():
    torch.manual_seed(0)
    layer = StraightThrough().build(SparseMatrixSpec((8,), (8,), k=8), dict(StraightThrough.defaults))
    opt = torch.optim.Adam(layer.parameters(), lr=0.1)
    for _ in range(300):
        x = torch.randn(32, 8)
        loss = layer.objective(((layer(x) - x) ** 2).mean(1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    layer.eval()
    torch.testing.assert_close(layer(torch.eye(8)), torch.eye(8))


def test_a_free_permutation_learns_to_keep_the_order():
    torch.manual_seed(0)
    spec = PermutationSpec(n=5, source="free")
    layer = StraightThrough().build(spec, dict(StraightThrough.defaults))
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    for _ in range(300):
        x = torch.randn(16, 5, 1)
        loss = layer.objective(((layer(16).matrix @ x - x) ** 2).mean((1, 2)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    layer.eval()
    torch.testing.assert_close(layer(1).matrix[0], torch.eye(5))
