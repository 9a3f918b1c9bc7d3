"""The sorting cells of the shipped presets, resolved through the real config and plugin path."""

from __future__ import annotations

import pytest

from harness.config import load_config, preset_names
from harness.matrix import Cell, resolve_cells
from harness.plugins import load


@pytest.fixture(scope="module")
def registry():
    return load([])


def sorting_cells(preset: str, registry) -> list[Cell]:
    return [c for c in resolve_cells(load_config(preset), registry) if c.task == "sorting"]


def test_paper_preset_runs_the_authors_budgets(registry) -> None:
    """30k/60k/120k steps at n = 4/8/16, one evaluation every 500/500/1000 (plot.sort.py)."""
    cells = [c for c in sorting_cells("paper", registry) if c.task_params["digits"] == 3]
    budgets = {(c.task_params["n"], c.task_params["steps"], c.task_params["eval_every"])
               for c in cells}
    assert budgets == {(4, 30_000, 500), (8, 60_000, 500), (16, 120_000, 1_000)}
    for c in cells:
        p = c.task_params
        assert (p["protocol"], p["loss"], p["batch_size"], p["lr"], p["eval_instances"]) == (
            "bloem", "intermediate_bce", 64, 5e-5, 10_000)
    sparse = [c for c in cells if c.estimator == "sparse"]
    assert all(c.estimator_params["C"] == 10.0 and c.estimator_params["samples"] == 0
               for c in sparse)  # a = n samples (0 means n)
    assert all(c.na_reason is None for c in sparse)


def test_paper_preset_has_a_fig7_cell_of_eight_single_digit_numbers(registry) -> None:
    fig7 = [c for c in sorting_cells("paper", registry) if c.task_params["digits"] == 1]
    assert {c.variant for c in fig7} == {"n=8,digits=1"}
    sparse = [c for c in fig7 if c.estimator == "sparse"]
    assert sparse and all(c.task_params["snapshots"] == [0] and c.task_params["steps"] == 1
                          for c in sparse)


def test_neuralsort_preset_is_grover_et_al_with_their_temperature_grid(registry) -> None:
    assert "neuralsort" in preset_names()
    cells = sorting_cells("neuralsort", registry)
    assert {c.task_params["n"] for c in cells} == {3, 5, 7, 9, 15}
    for c in cells:
        p = c.task_params
        assert (p["protocol"], p["digits"], p["loss"], p["batch_size"], p["lr"]) == (
            "neuralsort", 4, "permutation_ce", 20, 1e-4)
    grid = [1.0, 2.0, 4.0, 8.0, 16.0]
    # deterministic NeuralSort (0 Gumbel samples) and stochastic NeuralSort with their n_s = 5
    for estimator, key, methods in (("dense", "tau", 2), ("gumbel_sinkhorn", "temperature", 1)):
        mine = [c for c in cells if c.estimator == estimator and c.task_params["n"] == 5]
        assert sorted({c.estimator_params[key] for c in mine}) == grid
        assert len(mine) == len(grid) * 3 * methods  # three seeds per temperature and method
    dense = [c for c in cells if c.estimator == "dense"]
    assert sorted({c.estimator_params["gumbel_samples"] for c in dense}) == [0, 5]
    assert {c.estimator_params["samples"] for c in cells if c.estimator == "gumbel_sinkhorn"} == {5}
    quicksort = [c for c in cells if c.estimator == "sparse"]
    assert quicksort and all("power of two" in c.na_reason for c in quicksort)
    assert all(c.na_reason is None for c in cells if c.estimator != "sparse")
