"""Numbers to sort: digits shown match the values, protocols, ties, tie-aware scoring."""

from __future__ import annotations

import pytest
import torch

from harness.testing import DEVICES
from plugins.data.mnist import DataConfigError, DataError, DigitSet, MNISTSplits, load_mnist
from plugins.data.numbers import (
    NEURALSORT_PROTOCOL,
    PAPER_PROTOCOL,
    order_correct,
    order_strict,
    sorting_correct,
    sorting_indices,
    sorting_instances,
    target_permutation,
    validation_split,
)

PROTOCOL_CASES = [
    pytest.param(p.digits_per_number, n, id=f"{p.name}-n{n}")
    for p in (PAPER_PROTOCOL, NEURALSORT_PROTOCOL)
    for n in p.sizes
]


@pytest.fixture(scope="module")
def splits() -> MNISTSplits:
    return load_mnist()


@pytest.mark.parametrize(("d", "n"), PROTOCOL_CASES)
def test_protocol_shapes_and_value_range(splits: MNISTSplits, d: int, n: int) -> None:
    images, values = sorting_instances(splits.train, 6, n, d, seed=0)
    assert images.shape == (6, n, d, 28, 28) and images.dtype == torch.float32
    assert values.shape == (6, n) and values.dtype == torch.int64
    assert values.min() >= 0 and values.max() < 10**d
    assert images.min() >= 0 and images.max() <= 1


def test_protocols_match_the_papers() -> None:
    assert (PAPER_PROTOCOL.digits_per_number, PAPER_PROTOCOL.sizes) == (3, (4, 8, 16))
    assert (NEURALSORT_PROTOCOL.digits_per_number, NEURALSORT_PROTOCOL.sizes) == (
        4,
        (3, 5, 7, 9, 15),
    )


def test_digits_shown_spell_the_values_most_significant_first(splits: MNISTSplits) -> None:
    test = splits.test
    index, values = sorting_indices(test, 50, 8, 3, seed=4)
    shown = test.labels[index]  # (50, 8, 3) labels of the images shown
    assert torch.equal(shown[..., 0] * 100 + shown[..., 1] * 10 + shown[..., 2], values)
    assert torch.equal(shown[..., 2], values % 10)  # the last image is the units digit
    images, values_again = sorting_instances(test, 50, 8, 3, seed=4)
    assert torch.equal(values_again, values)
    assert torch.equal(images, test.images[index])  # only test digits, exactly those indexed
    assert int(index.max()) < len(test)


def test_each_label_draws_across_its_class(splits: MNISTSplits) -> None:
    index, _ = sorting_indices(splits.train, 400, 4, 3, seed=1)
    # 4,800 draws over 4,000 digits: many distinct images per label, not one per label
    assert index.unique().numel() > 2000


def test_deterministic_from_seed(splits: MNISTSplits) -> None:
    a = sorting_instances(splits.train, 5, 4, 3, seed=9)
    b = sorting_instances(splits.train, 5, 4, 3, seed=9)
    c = sorting_instances(splits.train, 5, 4, 3, seed=10)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_ties_are_allowed_and_the_target_sort_is_stable(splits: MNISTSplits) -> None:
    _, values = sorting_indices(splits.train, 20, 16, 1, seed=0)  # 16 one-digit numbers: ties
    perm = target_permutation(values)  # (20, 16)
    ordered = values.gather(1, perm)
    assert (ordered[:, 1:] >= ordered[:, :-1]).all()
    same = ordered[:, 1:] == ordered[:, :-1]
    assert same.any()  # ties did occur
    assert (perm[:, 1:][same] > perm[:, :-1][same]).all()  # equal values keep input order


def _reference(keys: list[float], values: list[int]) -> tuple[bool, list[bool]]:
    """Plain Python: read values in (stable) key order; compare with the sorted values."""
    in_key_order = [v for _, _, v in sorted(zip(keys, range(len(keys)), values, strict=True))]
    target = sorted(values)
    per_element = [a == b for a, b in zip(in_key_order, target, strict=True)]
    non_decreasing = all(a <= b for a, b in zip(in_key_order, in_key_order[1:], strict=False))
    return non_decreasing, per_element


@pytest.mark.parametrize("device", DEVICES)
def test_sorting_correct_is_tie_aware(device: str) -> None:
    values = torch.tensor([[3, 1, 3, 2]] * 4, device=device)
    keys = torch.tensor(
        [
            [2.0, 0.0, 3.0, 1.0],  # 1, 2, 3a, 3b
            [3.0, 0.0, 2.0, 1.0],  # 1, 2, 3b, 3a: equal numbers swapped, still sorted
            [2.0, 1.0, 3.0, 0.0],  # 2, 1, 3, 3: first two positions wrong
            [0.0, 0.0, 0.0, 0.0],  # equal keys: input order 3, 1, 3, 2
        ],
        device=device,
    )
    all_correct, per_element = sorting_correct(keys, values)
    assert all_correct.tolist() == [True, True, False, False]
    assert per_element[2].tolist() == [False, False, True, True]
    assert per_element[3].tolist() == [False, False, True, False]
    assert all_correct.device.type == per_element.device.type == torch.device(device).type


@pytest.mark.parametrize("device", DEVICES)
def test_sorting_correct_matches_python_reference(device: str) -> None:
    g = torch.Generator().manual_seed(0)
    values = torch.randint(0, 3, (300, 5), generator=g)  # many ties
    keys = values + torch.randn(300, 5, generator=g) * 0.7  # often right, sometimes wrong
    all_correct, per_element = sorting_correct(keys.to(device), values.to(device))
    for i in range(300):
        ok, flags = _reference(keys[i].tolist(), values[i].tolist())
        assert bool(all_correct[i]) == ok
        assert per_element[i].tolist() == flags
    assert 0 < int(all_correct.sum()) < 300  # both outcomes exercised


@pytest.mark.parametrize("device", DEVICES)
def test_strict_error_counts_a_swapped_tie_as_wrong(device: str) -> None:
    """The authors' index comparison: of a batch where every instance has a tie, the tie-aware
    error counts one wrong order, the strict one also the two that swap the equal numbers."""
    values = torch.tensor([[3, 1, 3, 2]] * 4, device=device)
    orders = torch.tensor(
        [
            [1, 3, 0, 2],  # 1, 2, 3a, 3b: the sort, ties in input order
            [1, 3, 2, 0],  # 1, 2, 3b, 3a: a correct sort, not the strict one
            [3, 1, 0, 2],  # 2, 1, 3a, 3b: wrong either way
            [1, 3, 2, 0],  # swapped again
        ],
        device=device,
    )
    aware, _ = order_correct(orders, values)
    strict = order_strict(orders, values)
    assert aware.tolist() == [True, True, False, True]
    assert strict.tolist() == [True, False, False, False]
    assert 100 * (1 - aware.double().mean()) == 25.0 and 100 * (1 - strict.double().mean()) == 75.0
    without_ties = torch.tensor([[4, 1, 3, 2]], device=device)  # order [1, 3, 2, 0] sorts it
    assert order_strict(orders[1:2], without_ties).item() is True
    assert order_correct(orders[1:2], without_ties)[0].item() is True
    with pytest.raises(ValueError, match="must both be"):
        order_strict(orders[:, :3], values)


def test_without_ties_scoring_is_exact_argsort_match() -> None:
    values = torch.stack([torch.randperm(8, generator=torch.Generator().manual_seed(i))
                          for i in range(50)])
    keys = values.float() + torch.randn(50, 8, generator=torch.Generator().manual_seed(1))
    all_correct, per_element = sorting_correct(keys, values)
    exact = torch.argsort(keys, dim=1) == torch.argsort(values, dim=1)
    assert torch.equal(per_element, exact)
    assert torch.equal(all_correct, exact.all(1))


def test_bad_sizes_and_incomplete_pools_are_named(splits: MNISTSplits) -> None:
    with pytest.raises(DataConfigError, match="n=0"):
        sorting_indices(splits.train, 4, 0, 3, seed=0)
    with pytest.raises(DataConfigError, match="digits_per_number=19"):
        sorting_indices(splits.train, 4, 4, 19, seed=0)
    no_sevens = splits.train.labels != 7
    pool = DigitSet(splits.train.images[no_sevens], splits.train.labels[no_sevens])
    with pytest.raises(DataError, match=r"label\(s\) \[7\]"):
        sorting_indices(pool, 4, 4, 3, seed=0)
    with pytest.raises(ValueError, match="must both be"):
        sorting_correct(torch.zeros(2, 3), torch.zeros(2, 4, dtype=torch.int64))


def test_order_correct_scores_a_predicted_order_as_sorting_correct_scores_keys() -> None:
    g = torch.Generator().manual_seed(2)
    values = torch.randint(0, 4, (200, 6), generator=g)  # ties
    keys = values + torch.randn(200, 6, generator=g)
    order = keys.argsort(dim=1, stable=True)
    for got, want in zip(order_correct(order, values), sorting_correct(keys, values), strict=True):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="order .* must both be"):
        order_correct(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 4, dtype=torch.int64))


def test_validation_split_holds_out_every_sixth_digit(splits: MNISTSplits) -> None:
    train, val = validation_split(splits.train)
    assert (len(train), len(val)) == (4000 - 4000 // 6, 4000 // 6)
    torch.testing.assert_close(val.images, splits.train.images[5::6])
    torch.testing.assert_close(val.labels, splits.train.labels[5::6])
    keep = torch.arange(4000) % 6 != 5
    torch.testing.assert_close(train.images, splits.train.images[keep])
    # the embedded pool is stored by class: every class is held out in proportion
    counts = torch.bincount(val.labels, minlength=10)
    assert counts.min() >= 400 // 6 and counts.max() <= 400 // 6 + 1
    with pytest.raises(DataConfigError, match="every=1"):
        validation_split(splits.train, every=1)
