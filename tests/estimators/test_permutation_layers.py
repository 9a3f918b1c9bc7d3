"""Permutation-kind layers and their functional cores: contracts, references, gradients, toys."""

from __future__ import annotations

import itertools

import pytest
import torch

from estimators.base import PermutationOutput, PermutationSpec
from estimators.plugins.dense import NeuralSortLayer
from estimators.plugins.gumbel_sinkhorn import GumbelSinkhornLayer
from estimators.plugins.reinforce import PlackettLuceLayer
from estimators.plugins.sparse import QuicksortLayer
from estimators.shared.neuralsort import neuralsort, sort_matrix
from estimators.shared.plackett_luce import perm_matrix, plackett_luce_log_prob, plackett_luce_sample
from estimators.shared.sinkhorn import gumbel_sinkhorn, hungarian, log_sinkhorn
from harness.testing import DEVICES

KEY_LAYERS = {
    "quicksort": QuicksortLayer,
    "neuralsort": NeuralSortLayer,
    "plackett_luce": PlackettLuceLayer,
}
KEYS = PermutationSpec(n=8, source="keys")


def rank_scores(keys: torch.Tensor) -> torch.Tensor:
    """Per-item scores in Mena et al.'s layout that peak at each item's ascending rank.

    ``(b, n)`` keys -> ``(b, n, n)``: ``scores[:, j, k] = -(rank_j - k)^2``.
    """
    n = keys.shape[-1]
    ranks = keys.argsort(-1).argsort(-1).to(keys.dtype)  # (b, n)
    positions = torch.arange(n, dtype=keys.dtype, device=keys.device)
    return -(ranks.unsqueeze(-1) - positions).pow(2)


def gen(device: str, seed: int = 0) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def sort_loss(out: PermutationOutput, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-instance squared error of the permuted ``x: (b, n)``; ``(b,)``."""
    return ((out.matrix @ x.unsqueeze(-1)).squeeze(-1) - target).pow(2).sum(-1)


@pytest.mark.parametrize("name", KEY_LAYERS)
@pytest.mark.parametrize("device", DEVICES)
def test_eval_mode_gives_the_hard_sort(name, device):
    layer = KEY_LAYERS[name](KEYS).to(device).eval()
    keys = torch.randn(16, 8, device=device)
    out = layer(keys)
    assert torch.equal(out.matrix, sort_matrix(keys))


@pytest.mark.parametrize("device", DEVICES)
def test_gumbel_sinkhorn_reads_n_scores_per_item_and_matches_at_eval(device):
    layer = GumbelSinkhornLayer(KEYS).to(device).eval()
    assert layer.scores_per_item == 8
    assert NeuralSortLayer(KEYS).scores_per_item == 1
    assert GumbelSinkhornLayer(PermutationSpec(n=8, source="free")).scores_per_item == 1
    keys = torch.randn(16, 8, device=device)
    assert torch.equal(layer(rank_scores(keys)).matrix, sort_matrix(keys))
    # the scores are item-major: the same matrix read as position-major sorts the inverse order
    scores = torch.randn(16, 8, 8, device=device)
    torch.testing.assert_close(layer(scores).matrix, hungarian(scores).transpose(-1, -2))


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_reach_the_gumbel_sinkhorn_scores(device):
    layer = GumbelSinkhornLayer(KEYS).to(device).train()
    scores = torch.randn(16, 8, 8, device=device).requires_grad_()
    x = torch.rand(16, 8, device=device)
    out = layer(scores, generator=gen(device))
    # Mena et al. normalise the item-major columns last: every output position (row) sums to 1
    torch.testing.assert_close(out.matrix.sum(-1), torch.ones(16, 8, device=device))
    layer.objective(sort_loss(out, x, x.sort(-1).values)).backward()
    assert torch.isfinite(scores.grad).all() and scores.grad.abs().sum() > 0


@pytest.mark.parametrize("name", KEY_LAYERS)
@pytest.mark.parametrize("device", DEVICES)
def test_gradients_reach_the_keys(name, device):
    layer = KEY_LAYERS[name](KEYS).to(device).train()
    keys = (0.3 * torch.randn(16, 8, device=device)).requires_grad_()
    x = torch.rand(16, 8, device=device)
    out = layer(keys)
    layer.objective(sort_loss(out, x, x.sort(-1).values)).backward()
    assert keys.grad is not None
    assert torch.isfinite(keys.grad).all() and keys.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["quicksort", "neuralsort", "plackett_luce"])
def test_keys_only_layers_refuse_free_specs(name):
    spec = PermutationSpec(n=8, source="free")
    assert "source='free'" in KEY_LAYERS[name].unsupported(spec)
    with pytest.raises(ValueError, match="source='free'"):
        KEY_LAYERS[name](spec)


def test_bad_parameters_are_named():
    with pytest.raises(ValueError, match="n=6"):
        QuicksortLayer(PermutationSpec(n=6, source="keys"))
    with pytest.raises(ValueError, match="samples must be >= 1"):
        PlackettLuceLayer(KEYS, samples=0)
    with pytest.raises(ValueError, match="baseline"):
        PlackettLuceLayer(KEYS, baseline="mean")
    with pytest.raises(ValueError, match="temperature"):
        GumbelSinkhornLayer(KEYS, temperature=0.0)
    with pytest.raises(ValueError, match=r"\(batch, 8\)"):
        NeuralSortLayer(KEYS)(torch.randn(2, 4))
    with pytest.raises(TypeError, match="batch size"):
        GumbelSinkhornLayer(PermutationSpec(n=4, source="free"))(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"\(batch, 8, 8\): 8 per item"):
        GumbelSinkhornLayer(KEYS)(torch.randn(2, 8))


def test_quicksort_layer_steps_and_intermediate_loss():
    layer = QuicksortLayer(KEYS, C=10.0, samples=4)
    keys = torch.randn(5, 8)
    x = torch.rand(5, 8, 2)
    out = layer(keys, generator=gen("cpu"))
    assert len(out.steps) == 3 and out.extras["keys"].shape == (5, 4, 8)
    target = torch.stack([x[b, keys[b].argsort()] for b in range(5)])
    assert out.intermediate
    xs = out.intermediate_inputs(x)
    ts = out.intermediate_targets(target)
    assert len(xs) == len(ts) == 4
    torch.testing.assert_close(ts[-1], target)
    torch.testing.assert_close(xs[-1], torch.einsum("bij,bjf->bif", out.matrix, x))
    assert layer.snapshot()["steps"].shape == (3, 8, 8)


# ---- references ---------------------------------------------------------------------------------


def naive_neuralsort(keys: list[float], tau: float) -> list[list[float]]:
    """Grover et al.'s descending formula, row by row, then rows reversed for ascending order."""
    n = len(keys)
    spread = [sum(abs(sj - sk) for sk in keys) for sj in keys]
    rows = []
    for i in range(1, n + 1):
        logits = [((n + 1 - 2 * i) * sj - spread[j]) / tau for j, sj in enumerate(keys)]
        top = max(logits)
        exps = [pow(2.718281828459045, v - top) for v in logits]
        rows.append([e / sum(exps) for e in exps])
    return rows[::-1]


@pytest.mark.parametrize("tau", [0.3, 1.0, 4.0])
def test_neuralsort_matches_the_paper_formula(tau):
    keys = torch.randn(4, 6, dtype=torch.float64)
    got = neuralsort(keys, tau)
    for b in range(4):
        expected = torch.tensor(naive_neuralsort(keys[b].tolist(), tau), dtype=torch.float64)
        torch.testing.assert_close(got[b], expected)
    spaced = torch.stack([torch.randperm(6) for _ in range(4)]).double()
    torch.testing.assert_close(neuralsort(spaced, 0.05), sort_matrix(spaced), atol=1e-6, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_sinkhorn_is_doubly_stochastic(device):
    log_alpha = torch.randn(8, 6, 6, device=device, dtype=torch.float64)
    p = gumbel_sinkhorn(log_alpha, iterations=200, generator=gen(device))
    assert (p >= 0).all()
    ones = torch.ones(8, 6, device=device, dtype=torch.float64)
    torch.testing.assert_close(p.sum(-2), ones)  # columns: exact, normalised last
    torch.testing.assert_close(p.sum(-1), ones, atol=1e-8, rtol=0)
    default = log_sinkhorn(log_alpha).exp()  # 20 iterations: columns exact, rows close
    torch.testing.assert_close(default.sum(-2), ones)
    torch.testing.assert_close(default.sum(-1), ones, atol=1e-3, rtol=0)


def test_hungarian_equals_brute_force():
    scores = torch.randn(20, 4, 4, dtype=torch.float64)
    got = hungarian(scores)
    for b in range(20):
        best = max(
            itertools.permutations(range(4)),
            key=lambda perm, s=scores[b]: sum(s[i, perm[i]].item() for i in range(4)),
        )
        assert torch.equal(got[b], perm_matrix(torch.tensor([best]), torch.float64)[0])


def naive_sinkhorn_item_major(scores: list[list[float]], temperature: float,
                              iterations: int) -> list[list[float]]:
    """Mena et al.'s operator in plain (not log) space on an item-major matrix, rows first,
    then transposed to positions x items: an independent reference for the layer."""
    n = len(scores)
    m = [[pow(2.718281828459045, v / temperature) for v in row] for row in scores]
    for _ in range(iterations):
        m = [[v / sum(row) for v in row] for row in m]
        cols = [sum(m[i][k] for i in range(n)) for k in range(n)]
        m = [[m[i][k] / cols[k] for k in range(n)] for i in range(n)]
    return [[m[j][k] for j in range(n)] for k in range(n)]


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_noiseless_gumbel_sinkhorn_layer_matches_a_plain_reference(temperature):
    torch.manual_seed(0)
    layer = GumbelSinkhornLayer(PermutationSpec(n=5, source="keys"), temperature=temperature,
                                noise=0.0, iterations=20)
    scores = torch.randn(3, 5, 5, dtype=torch.float64)
    got = layer(scores).matrix
    for b in range(3):
        want = naive_sinkhorn_item_major(scores[b].tolist(), temperature, 20)
        torch.testing.assert_close(got[b], torch.tensor(want, dtype=torch.float64))


@pytest.mark.parametrize("device", DEVICES)
def test_rank_scores_make_hungarian_and_cold_sinkhorn_sort(device):
    keys = torch.randn(16, 8, device=device)
    item_major = rank_scores(keys)
    assert torch.equal(hungarian(item_major).transpose(-1, -2), sort_matrix(keys))
    cold = gumbel_sinkhorn(item_major, temperature=0.1, noise=0.0)  # 20 iterations
    torch.testing.assert_close(cold.transpose(-1, -2), sort_matrix(keys), atol=1e-4, rtol=0)


def test_plackett_luce_probabilities_match_sampling():
    keys = torch.tensor([[0.2, -0.5, 0.9]], dtype=torch.float64)
    perms = torch.tensor(list(itertools.permutations(range(3))))  # (6, 3)
    log_p = plackett_luce_log_prob(keys.expand(6, 3), perms)
    torch.testing.assert_close(log_p.exp().sum(), torch.tensor(1.0, dtype=torch.float64))
    assert perms[log_p.argmax()].tolist() == keys[0].argsort().tolist()  # mode: ascending
    draws = plackett_luce_sample(keys.expand(30000, 3), generator=gen("cpu"))
    for perm, p in zip(perms, log_p.exp(), strict=True):
        freq = (draws == perm).all(-1).double().mean()
        assert abs(freq - p) < 0.015


def test_plackett_luce_log_prob_gradcheck():
    keys = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    perm = plackett_luce_sample(keys, generator=gen("cpu"))
    assert torch.autograd.gradcheck(lambda k: plackett_luce_log_prob(k, perm), (keys,))


# ---- gradcheck of the deterministic (or fixed-sample) layers ------------------------------------


def test_gradcheck_neuralsort_layer():
    layer = NeuralSortLayer(PermutationSpec(n=5, source="keys"), tau=0.7)
    keys = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda k: layer(k).matrix, (keys,))


def test_gradcheck_noiseless_sinkhorn_layer():
    layer = GumbelSinkhornLayer(PermutationSpec(n=5, source="keys"), noise=0.0, temperature=2.0)
    scores = torch.randn(2, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda k: layer(k).matrix, (scores,))
    log_alpha = torch.randn(2, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a: gumbel_sinkhorn(a, noise=0.5, generator=gen("cpu", 7)), (log_alpha,)
    )


def test_gradcheck_quicksort_layer_with_a_fixed_sample():
    layer = QuicksortLayer(PermutationSpec(n=4, source="keys"), C=3.0)
    keys = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda k: layer(k, generator=gen("cpu", 1)).matrix, (keys,))


# ---- learning ---------------------------------------------------------------------------------


def test_plackett_luce_gradient_sign_moves_keys_to_ascending():
    """Loss 0 only for the identity order, 1 otherwise: REINFORCE must sort the free keys."""
    torch.manual_seed(0)
    layer = PlackettLuceLayer(PermutationSpec(n=3, source="keys"))
    keys = torch.nn.Parameter(torch.zeros(1, 3))
    opt = torch.optim.SGD([keys], lr=0.5)
    identity = torch.arange(3).unsqueeze(0)

    def p_identity() -> float:
        return plackett_luce_log_prob(keys.detach(), identity).exp().item()

    start = p_identity()
    for _ in range(150):
        out = layer(keys.expand(32, 3))
        loss = (out.matrix.argmax(-1) != identity).any(-1).float()  # (32,)
        opt.zero_grad()
        layer.objective(loss).backward()
        opt.step()
    assert start == pytest.approx(1 / 6)
    assert p_identity() > 0.6
    assert keys[0, 0] < keys[0, 1] < keys[0, 2]
    assert 0 < layer.snapshot()["baseline"] < 1


def expected_loss(layer, keys, x, target) -> float:
    """Mean training loss over fixed noise seeds (exact over all orders for Plackett-Luce)."""
    with torch.no_grad():
        if isinstance(layer, PlackettLuceLayer):
            perms = torch.tensor(list(itertools.permutations(range(x.shape[-1]))))
            p = plackett_luce_log_prob(keys.expand(len(perms), -1), perms).exp()
            losses = sort_loss(PermutationOutput([perm_matrix(perms)]), x, target)
            return (p * losses).sum().item()
        if isinstance(layer, NeuralSortLayer):  # deterministic
            return sort_loss(layer(keys), x, target).mean().item()
        runs = [sort_loss(layer(keys, generator=gen("cpu", s)), x, target) for s in range(10)]
        return torch.cat(runs).mean().item()


@pytest.mark.parametrize("name", KEY_LAYERS)
def test_training_free_keys_reduces_the_sorting_loss(name):
    torch.manual_seed(0)
    layer = KEY_LAYERS[name](PermutationSpec(n=4, source="keys"))
    x = torch.tensor([[0.3, 0.9, 0.1, 0.6]])
    target = x.sort(-1).values
    keys = torch.nn.Parameter(torch.tensor([[0.3, 0.2, 0.1, 0.0]]))  # far from x's order
    opt = torch.optim.Adam([keys], lr=0.05)
    before = expected_loss(layer, keys, x, target)
    for _ in range(120):
        loss = sort_loss(layer(keys), x, target)
        opt.zero_grad()
        layer.objective(loss).backward()
        opt.step()
    after = expected_loss(layer, keys, x, target)
    assert after < 0.25 * before
    assert torch.equal(layer.eval()(keys.detach()).matrix, sort_matrix(x))


def test_training_free_sinkhorn_logits_reduces_the_loss():
    torch.manual_seed(0)
    layer = GumbelSinkhornLayer(PermutationSpec(n=4, source="free"), noise=0.5)
    x = torch.tensor([[0.3, 0.9, 0.1, 0.6]]).expand(8, 4)
    target = x.sort(-1).values
    opt = torch.optim.Adam(layer.parameters(), lr=0.1)

    def mean_loss() -> float:
        with torch.no_grad():
            return sort_loss(layer(64, generator=gen("cpu")), x[:1], target[:1]).mean().item()

    before = mean_loss()
    for _ in range(150):
        loss = sort_loss(layer(8), x, target)
        opt.zero_grad()
        layer.objective(loss).backward()
        opt.step()
    assert mean_loss() < 0.25 * before
    hard = layer.eval()(3)
    assert hard.matrix.shape == (3, 4, 4)
    assert torch.equal(hard.matrix, sort_matrix(x[:3]))
    assert layer.snapshot()["logits"].shape == (4, 4)
