"""The sparse differentiable quicksort (paper section 3.3, Algorithm 2) against naive references."""

from __future__ import annotations

import math

import pytest
import torch

from estimators.sparse.quicksort import (
    chunk_medians,
    duplicate_vector_mask,
    half_permutation_matrix,
    half_permutation_rows,
    hard_half_vector,
    identity_half_vector,
    intermediate_inputs,
    intermediate_targets,
    num_steps,
    quicksort,
    sample_half_vectors,
    soft_half_permutation,
)
from harness.testing import DEVICES

ORDERS = [(n, d) for n in (2, 4, 8, 16) for d in range(1, num_steps(n) + 1)]


def gen(device: str, seed: int = 0) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def naive_half_permutation(o: list[int], order: int) -> list[list[float]]:
    """Dense ``P^order(o)`` from the definition: per chunk, the zeros then the ones, in order."""
    n = len(o)
    c = n // 2 ** (order - 1)
    placed = []  # placed[row] = input index
    for start in range(0, n, c):
        chunk = range(start, start + c)
        placed += [i for i in chunk if not o[i]] + [i for i in chunk if o[i]]
    return [[1.0 if placed[row] == col else 0.0 for col in range(n)] for row in range(n)]


@pytest.mark.parametrize(("n", "order"), ORDERS)
def test_half_permutations_of_every_order_are_the_defined_permutations(n, order):
    o = sample_half_vectors(1, n, order, 20, generator=gen("cpu")).squeeze(0)  # (20, n)
    c = n // 2 ** (order - 1)
    assert (o.view(20, n // c, c).sum(-1) == c // 2).all()  # valid: half ones per chunk
    mats = half_permutation_matrix(o, order, torch.float64)  # (20, n, n)
    assert ((mats == 0) | (mats == 1)).all()
    assert (mats.sum(-1) == 1).all() and (mats.sum(-2) == 1).all()
    for vec, mat in zip(o, mats, strict=True):
        assert mat.tolist() == naive_half_permutation(vec.tolist(), order)
    identity = half_permutation_matrix(identity_half_vector(n, order), order)
    assert torch.equal(identity, torch.eye(n))


def test_random_half_vectors_cover_all_valid_vectors_evenly():
    o = sample_half_vectors(1, 4, 1, 6000, generator=gen("cpu")).squeeze(0)  # (6000, 4)
    counts = {}
    for row in o.int().tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    assert len(counts) == math.comb(4, 2)
    assert all(abs(c / 6000 - 1 / 6) < 0.02 for c in counts.values())


def test_bad_sizes_and_orders_name_the_value():
    with pytest.raises(ValueError, match="n=6"):
        num_steps(6)
    with pytest.raises(ValueError, match="order=4"):
        identity_half_vector(8, 4)
    with pytest.raises(ValueError, match=r"\(batch, n\)"):
        quicksort(torch.randn(8))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [2, 4, 8, 16])
def test_hard_quicksort_sorts_exactly(device, n):
    keys = torch.randn(32, n, device=device)
    steps, trace = quicksort(keys, hard=True)
    assert len(steps) == num_steps(n)
    matrix = steps[0]
    for step in steps[1:]:
        matrix = step @ matrix
    ranks = keys.argsort(-1)
    expected = torch.nn.functional.one_hot(ranks, n).float()
    assert torch.equal(matrix, expected)
    assert torch.equal(trace[:, -1], keys.sort(-1).values)


@pytest.mark.parametrize("device", DEVICES)
def test_ties_split_by_position_and_sort_stably(device):
    keys = torch.randint(0, 3, (64, 8), device=device).float()  # many ties at the median
    for order in range(1, 4):
        c = 8 // 2 ** (order - 1)
        o = hard_half_vector(keys, order)
        assert (o.view(64, 8 // c, c).sum(-1) == c // 2).all()
    steps, _ = quicksort(keys, hard=True)
    matrix = steps[2] @ steps[1] @ steps[0]
    stable = torch.nn.functional.one_hot(keys.argsort(dim=-1, stable=True), 8).float()
    assert torch.equal(matrix, stable)
    all_equal = torch.zeros(1, 4, device=device)  # every key on the median: o' = 0.5 everywhere
    z = 10.0 * (all_equal - chunk_medians(all_equal, 1))
    assert torch.equal(torch.sigmoid(z), torch.full_like(z, 0.5))
    assert hard_half_vector(all_equal, 1).tolist() == [[False, False, True, True]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [4, 8, 16])
def test_training_mode_sorts_keys_far_apart(device, n):
    keys = 10.0 * torch.stack([torch.randperm(n) for _ in range(8)]).float().to(device)
    steps, trace = quicksort(keys, C=10.0, generator=gen(device))
    matrix = steps[0]
    for step in steps[1:]:
        matrix = step @ matrix
    expected = torch.nn.functional.one_hot(keys.argsort(-1), n).float()
    torch.testing.assert_close(matrix, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(trace[:, -1], keys.sort(-1).values)


@pytest.mark.parametrize("device", DEVICES)
def test_soft_steps_are_doubly_stochastic(device):
    keys = torch.randn(16, 8, device=device)
    steps, _ = quicksort(keys, generator=gen(device))
    for step in steps:
        assert (step >= 0).all()
        torch.testing.assert_close(step.sum(-2), torch.ones(16, 8, device=device))
        torch.testing.assert_close(step.sum(-1), torch.ones(16, 8, device=device))


def naive_soft_step(keys: list[float], vectors: list[list[int]], order: int, C: float):
    """Dense reference: unique vectors weighted by prod o'^o (1-o')^(1-o), columns normalised."""
    n = len(keys)
    c = n // 2 ** (order - 1)
    o_soft = []
    for start in range(0, n, c):
        chunk = sorted(keys[start : start + c])
        median = (chunk[c // 2 - 1] + chunk[c // 2]) / 2
        o_soft += [1 / (1 + math.exp(-C * (k - median))) for k in keys[start : start + c]]
    seen, total = set(), [[0.0] * n for _ in range(n)]
    for o in vectors:
        if tuple(o) in seen:
            continue
        seen.add(tuple(o))
        p = math.prod(s if bit else 1 - s for s, bit in zip(o_soft, o, strict=True))
        mat = naive_half_permutation(o, order)
        total = [
            [t + p * m for t, m in zip(tr, mr, strict=True)]
            for tr, mr in zip(total, mat, strict=True)
        ]
    colsum = [sum(total[r][col] for r in range(n)) for col in range(n)]
    return [[total[r][col] / colsum[col] for col in range(n)] for r in range(n)]


@pytest.mark.parametrize(("n", "order"), [(4, 1), (4, 2), (8, 1), (8, 2), (8, 3)])
def test_soft_step_matches_a_dense_reference(n, order):
    keys = torch.randn(3, n, dtype=torch.float64) * 0.3
    got = soft_half_permutation(keys, order, C=10.0, samples=12, generator=gen("cpu", 5))
    sampled = sample_half_vectors(3, n, order, 12, generator=gen("cpu", 5))  # same draws
    for b in range(3):
        row = keys[b].tolist()
        c = n // 2 ** (order - 1)
        hard = []  # upper half of the ranks in every chunk, ties by position
        for start in range(0, n, c):
            ranked = sorted(range(start, start + c), key=lambda i: (row[i], i))
            upper = set(ranked[c // 2 :])
            hard += [int(i in upper) for i in range(start, start + c)]
        vectors = [hard] + sampled[b].int().tolist()
        expected = torch.tensor(naive_soft_step(row, vectors, order, 10.0), dtype=torch.float64)
        torch.testing.assert_close(got[b], expected)


@pytest.mark.parametrize("n", [4, 70])  # 70 bits need two packed words
def test_duplicate_vector_mask_marks_all_repeats_but_the_first(n):
    base = torch.rand(2, 5, n, generator=gen("cpu", 1)) > 0.5
    pick = torch.randint(0, 5, (2, 40), generator=gen("cpu", 2))
    o = torch.stack([base[b, pick[b]] for b in range(2)])  # (2, 40, n) with many repeats
    got = duplicate_vector_mask(o)
    for b in range(2):
        seen, expected = set(), []
        for vec in o[b].int().tolist():
            expected.append(tuple(vec) in seen)
            seen.add(tuple(vec))
        assert got[b].tolist() == expected
    assert got.sum() > 0


def test_rows_follow_algorithm_2_for_a_worked_example():
    o = torch.tensor([1, 0, 0, 1, 0, 1, 1, 0], dtype=torch.bool)
    # order 1: zeros (inputs 1, 2, 4, 7) fill rows 0-3, ones (0, 3, 5, 6) rows 4-7
    assert half_permutation_rows(o, 1).tolist() == [4, 0, 1, 5, 2, 6, 7, 3]
    # order 2: chunks [0..3], [4..7], each split into halves of two
    assert half_permutation_rows(o, 2).tolist() == [2, 0, 1, 3, 4, 6, 7, 5]


@pytest.mark.parametrize("n", [4, 8])
def test_gradcheck_with_a_fixed_sample(n):
    keys = torch.randn(2, n, dtype=torch.float64, requires_grad=True)

    def composed(k: torch.Tensor) -> torch.Tensor:
        steps = quicksort(k, C=2.0, samples=n, generator=gen("cpu", 3)).steps
        matrix = steps[0]
        for step in steps[1:]:
            matrix = step @ matrix
        return matrix

    assert torch.autograd.gradcheck(composed, (keys,), fast_mode=n > 4)  # random projections


@pytest.mark.parametrize("device", DEVICES)
def test_intermediate_targets_retrieve_the_input_when_keys_are_right(device):
    keys = torch.randn(4, 8, device=device)
    x = torch.rand(4, 8, 3, device=device)  # items with a trailing feature axis
    target = torch.stack([x[b, keys[b].argsort()] for b in range(4)])  # sorted by the keys
    steps, _ = quicksort(keys, hard=True)
    xs, ts = intermediate_inputs(steps, x), intermediate_targets(steps, target)
    assert len(xs) == len(ts) == num_steps(8) + 1
    for xd, td in zip(xs, ts, strict=True):
        torch.testing.assert_close(xd, td)

    soft, _ = quicksort(keys, generator=gen(device))
    ts = intermediate_targets(soft, target)
    for d, step in enumerate(soft, start=1):  # t_{d-1} = P_d^T t_d, checked entry by entry
        expected = torch.einsum("bij,bif->bjf", step, ts[d])
        torch.testing.assert_close(ts[d - 1], expected)
