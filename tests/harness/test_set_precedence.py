"""``--set`` wins over every preset and config value: base sections, variants and matching
``[[overrides]]`` alike; ``--set overrides=[...]`` appends as a config file does."""

from __future__ import annotations

import pytest

from harness import config
from harness.errors import ConfigError
from harness.matrix import Selection, resolve_cells
from harness.plugins import load

REGISTRY = load()


def _cells(preset: str, sets: list[str], config_file=None, **selection):
    sets = [*sets, "tuning.trials=0"]  # precedence, not tuning: one cell per configuration
    raw = config.load_config(preset, config_file, sets)
    return resolve_cells(raw, REGISTRY, Selection(**selection), forced=config.set_layer(sets))


def test_set_beats_a_presets_per_cell_override():
    # quick's [[overrides]] give sparse on identity a_l = 1 at n = 8, 2 at n = 16; the command line wins
    cells = _cells("quick", ["estimators.sparse.a_l=5"], tasks=("identity",), estimators=("sparse",))
    assert {c.estimator_params["a_l"] for c in cells} == {5}
    cells = _cells("paper", ["estimators.sparse.a_g=3"], tasks=("identity",), estimators=("sparse",))
    assert {c.estimator_params["a_g"] for c in cells} == {3}  # over a_g = 2, 2, 8, 10 per n
    assert {c.estimator_params["a_l"] for c in cells} == {1, 2}  # what --set did not name stays


def test_set_beats_variant_values_and_identical_cells_are_listed_once():
    cells = _cells("paper", ["tasks.identity.steps=50"], tasks=("identity",), estimators=("dense",))
    assert {c.task_params["steps"] for c in cells} == {50}  # variants set 10k .. 60k
    cells = _cells("quick", ["tasks.identity.n=4"], tasks=("identity",), estimators=("dense",))
    assert [c.variant for c in cells] == ["n=4"]  # both variants became n = 4: one cell


def test_a_set_key_removes_its_sweep():
    swept = _cells("paper", [], tasks=("identity",), estimators=("reinforce",), sizes=(8,), seeds=(0,))
    assert len(swept) == 9  # the paper's nine learning rates
    fixed = _cells(
        "paper",
        ["tasks.identity.lr=0.002"],
        tasks=("identity",),
        estimators=("reinforce",),
        sizes=(8,),
        seeds=(0,),
    )
    assert [(c.sweep, c.task_params["lr"]) for c in fixed] == [("", 0.002)]


def test_set_overrides_appends_like_a_config_file(tmp_path):
    entry = "{match = {task = 'identity', estimator = 'dense'}, task = {lr = 0.25}}"
    path = tmp_path / "extra.toml"
    path.write_text("[[overrides]]\nmatch = {task = 'identity', estimator = 'dense'}\ntask = {lr = 0.25}\n")
    by_set = _cells("quick", [f"overrides=[{entry}]"], tasks=("identity",))
    by_file = _cells("quick", [], config_file=path, tasks=("identity",))
    assert [(c.cell_id, c.task_params) for c in by_set] == [(c.cell_id, c.task_params) for c in by_file]
    dense = [c for c in by_set if c.estimator == "dense"]
    assert {c.task_params["lr"] for c in dense} == {0.25}  # later overrides win over earlier ones
    # the preset's overrides are still there: sparse keeps quick's a_l = 1 at n = 8, 2 at n = 16
    assert [c.estimator_params["a_l"] for c in by_set if c.estimator == "sparse"] == [1, 2]


def test_a_set_table_merges_into_its_table():
    cells = _cells("quick", ["tasks.identity={steps = 7}"], tasks=("identity",), estimators=("dense",))
    assert [c.variant for c in cells] == ["n=8", "n=16"]  # the preset's variants survive
    assert {c.task_params["steps"] for c in cells} == {7}


def test_set_values_are_checked_like_any_other():
    with pytest.raises(ConfigError, match=r"\[tasks.identity\]: unknown key 'nope'"):
        _cells("quick", ["tasks.identity.nope=1"], tasks=("identity",))
    with pytest.raises(ConfigError, match="lr = nan must be a finite number"):
        _cells("quick", ["tasks.identity.lr=nan"], tasks=("identity",))
