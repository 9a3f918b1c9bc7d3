"""Exact references for the perturbation estimators' tests, independent of the code under test,
handed to tests as the ``exact`` fixture (this module).

Gaussian noise: the law of the hard solution as one-dimensional integrals (Gauss-Hermite, 120
nodes, of smooth integrands: exact to ~1e-12), its gradient a central finite difference of them.
Gumbel noise: perturb-and-MAP of a sort or a top-k is Plackett-Luce sampling (the Gumbel-max
trick), whose law is enumerated in closed form (torch, float64, differentiable).
"""

from __future__ import annotations

import itertools
import math
import sys

import numpy as np
import pytest
import torch
from scipy.stats import norm

_NODES, _WEIGHTS = np.polynomial.hermite.hermgauss(120)


def _normal_expectation(mean: float, sigma: float, f) -> float:
    """``E[f(T)]`` for ``T ~ N(mean, sigma^2)`` by 120-node Gauss-Hermite quadrature (``f`` smooth)."""
    return float((_WEIGHTS * f(mean + np.sqrt(2) * sigma * _NODES)).sum() / np.sqrt(np.pi))


def gaussian_sort_mean(keys: np.ndarray, sigma: float) -> np.ndarray:
    """``E[sort_matrix(keys + sigma Z)]`` for ``n = 3`` keys: ``(3, 3)``, row = position.

    ``P(X_a < X_b < X_c) = E_{t ~ X_b}[Phi_a(t) (1 - Phi_c(t))]``, one quadrature per order.
    """
    if keys.shape != (3,):
        raise ValueError("the quadrature reference covers n = 3")
    out = np.zeros((3, 3))
    for a, b, c in itertools.permutations(range(3)):
        p = _normal_expectation(
            keys[b], sigma, lambda t, a=a, c=c: norm.cdf(t, keys[a], sigma) * norm.sf(t, keys[c], sigma)
        )
        out[0, a] += p
        out[1, b] += p
        out[2, c] += p
    return out


def gaussian_topk_mean(scores: np.ndarray, k: int, sigma: float) -> np.ndarray:
    """``P(entry e in topk(scores + sigma Z))`` for every entry: ``E_{t ~ X_e}[P(N_e(t) < k)]`` with
    ``N_e(t)`` the number of other entries above ``t`` (a Poisson-binomial count)."""

    def below_k(t: np.ndarray, e: int) -> np.ndarray:
        counts = np.zeros((k, t.size))  # counts[j] = P(j of the others so far exceed t), j < k
        counts[0] = 1.0
        for j, s in enumerate(scores):
            if j == e:
                continue
            up = norm.sf(t, s, sigma)
            counts[1:] = counts[1:] * (1 - up) + counts[:-1] * up
            counts[0] *= 1 - up
        return counts.sum(0)

    return np.array([_normal_expectation(scores[e], sigma, lambda t, e=e: below_k(t, e))
                     for e in range(len(scores))])


def central_difference(f, x: np.ndarray, h: float = 1e-5) -> np.ndarray:
    """``d f / d x`` of a scalar ``f`` by central differences."""
    grad = np.zeros_like(x)
    for i in range(x.size):
        step = np.zeros_like(x)
        step.flat[i] = h
        grad.flat[i] = (f(x + step) - f(x - step)) / (2 * h)
    return grad


def gumbel_sort_mean(keys: torch.Tensor) -> torch.Tensor:
    """``E[sort_matrix(keys + G)]`` (Gumbel ``G``) by enumerating the ``n!`` orders: ``(n, n)``.

    The largest perturbed key is item ``j`` with probability ``softmax(keys)_j``, then the largest of
    the rest, and so on (Plackett-Luce from the last position down).
    """
    n = keys.shape[-1]
    out = keys.new_zeros(n, n)
    for order in itertools.permutations(range(n)):  # order[i]: the item at ascending position i
        logp = keys.new_zeros(())
        for i in range(n):
            chosen = keys[list(order[: i + 1])]  # the largest remaining is order[i]
            logp = logp + keys[order[i]] - torch.logsumexp(chosen, 0)
        out = out + logp.exp() * torch.eye(n, dtype=keys.dtype)[list(order)]
    return out


def gumbel_topk_mean(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``P(e in topk(scores + G))`` for every entry, enumerating the ordered draws without replacement."""
    m = scores.shape[-1]
    out = scores.new_zeros(m)
    for picks in itertools.permutations(range(m), k):
        logp, left = scores.new_zeros(()), list(range(m))
        for e in picks:
            logp = logp + scores[e] - torch.logsumexp(scores[left], 0)
            left.remove(e)
        out = out + logp.exp() * torch.zeros(m, dtype=scores.dtype).index_fill(0, torch.tensor(picks), 1.0)
    return out


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / math.sqrt((a * a).sum() * (b * b).sum()))


def free_sort_after_training(layer: torch.nn.Module, device: str) -> torch.Tensor:
    """A free-key permutation layer started from keys (0.3, 0.1, -0.2, 0), trained 200 Adam steps on
    ``|P x - x|^2``: its eval permutation, which the estimator's gradient must have made the identity."""
    with torch.no_grad():
        layer.keys.free.copy_(torch.tensor([0.3, 0.1, -0.2, 0.0]))
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    for _ in range(200):
        x = torch.randn(16, 4, device=device)
        loss = ((layer(16).matrix @ x.unsqueeze(-1)).squeeze(-1) - x).pow(2).sum(-1)
        opt.zero_grad()
        layer.objective(loss).backward()
        opt.step()
    layer.eval()
    return layer(1).matrix[0]


@pytest.fixture(scope="session")
def exact():
    """This module: the references and the training helper above."""
    return sys.modules[__name__]
