"""Scheduling and resources on the shipped presets and plugins: cells start longest expected
first (what the store measured beats the task's own figure), and the ``resources`` a task or
variant declares reach the cell, are checked like any config value, and never change its id."""

from __future__ import annotations

import pytest

from harness import config
from harness.backends.ray_backend import resources_for
from harness.backends.schedule import expected_seconds, longest_first, measured_seconds
from harness.cli import main
from harness.errors import ConfigError
from harness.matrix import Selection, resolve_cells
from harness.plugins import load

REGISTRY = load()


def _cells(preset: str, sets: list[str] = (), **selection):
    sets = [*sets, "tuning.trials=0"]  # one cell per configuration, no tuning trials
    raw = config.load_config(preset, None, list(sets))
    return resolve_cells(raw, REGISTRY, Selection(**selection), forced=config.set_layer(list(sets)))


def test_longest_expected_first_na_cells_before_all():
    cells = _cells("quick")
    ordered = longest_first(cells, REGISTRY, {})
    assert sorted(c.cell_id for c in ordered) == sorted(c.cell_id for c in cells)
    na = [c.na_reason is not None for c in ordered]
    assert na == sorted(na, reverse=True) and any(na)  # every n/a cell (instant) comes first
    expected = [expected_seconds(c, REGISTRY, {}) for c in ordered if c.na_reason is None]
    assert expected == sorted(expected, reverse=True) and expected[0] > expected[-1]
    identity = [c for c in ordered if c.task == "identity" and c.na_reason is None]
    assert [c.task_params["n"] for c in identity][:1] == [16]  # steps x cost grows with n


def test_a_measured_time_beats_the_tasks_estimate(store_home, store, capsys):
    run = [
        "run", "--task", "identity", "--estimator", "dense", "--seeds", "0",
        "--set", "tasks.identity.variants=[{n = 4}, {n = 8}]",
        "--set", "tuning.trials=0",  # one cell per configuration, no tuning trials
        "--set", "tasks.identity.steps=10", "--set", "tasks.identity.eval_every=10",
        "--set", "tasks.identity.eval_samples=50", "--set", "tasks.identity.snapshots=[]",
        "--threads", "1", "--no-progress",
    ]  # fmt: skip
    assert main(run) == 0
    experiment = store.client.get_experiment_by_name(store.experiment).experiment_id
    measured = measured_seconds(store.client, experiment)
    walls = {r.info.run_name: r.data.metrics["summary/wall_s"] for r in store.runs("cell")}
    assert measured == {
        ("identity/n=4/dense", "10"): walls["identity/n=4/dense/seed=0"],
        ("identity/n=8/dense", "10"): walls["identity/n=8/dense/seed=0"],
    }
    # the same cells with another seed take what their family took; other step counts do not match
    cells = _cells("quick", ["tasks.identity.steps=10", "tasks.identity.variants=[{n = 4}]"],
                   tasks=("identity",), estimators=("dense",), seeds=(7,))
    (cell,) = cells
    assert expected_seconds(cell, REGISTRY, measured) == walls["identity/n=4/dense/seed=0"]
    slow = {("identity/n=8/dense", "10"): 1e6}
    cells = _cells("quick", ["tasks.identity.steps=10"], tasks=("identity",), estimators=("dense",))
    assert [c.variant for c in longest_first(cells, REGISTRY, slow)] == ["n=8", "n=16"]
    assert [c.variant for c in longest_first(cells, REGISTRY, {})] == ["n=16", "n=8"]


def test_resources_from_the_task_the_config_and_a_variant_leave_the_cell_id_alone():
    plain = {c.variant: c for c in _cells("quick", tasks=("identity",), estimators=("dense",))}
    assert {c.resources["num_gpus"] for c in plain.values()} == {0.25}  # the identity plugin's default
    variants = "tasks.identity.variants=[{n = 8}, {n = 16, resources = {num_gpus = 0.5, num_cpus = 2}}]"
    raw = config.load_config("quick", None, [variants, "tuning.trials=0"])
    raw["tasks"]["identity"]["resources"] = {"num_gpus": 0.125}  # a config file's [tasks.identity]
    cells = {c.variant: c for c in resolve_cells(raw, REGISTRY, Selection(("identity",), ("dense",)))}
    assert cells["n=8"].resources == {"num_cpus": 1.0, "num_gpus": 0.125}
    assert cells["n=16"].resources == {"num_cpus": 2.0, "num_gpus": 0.5}
    assert {v: c.cell_id for v, c in cells.items()} == {v: c.cell_id for v, c in plain.items()}
    assert resources_for(cells["n=16"], "cpu") == {"num_cpus": 2.0, "num_gpus": 0.0}  # no GPU asked on CPU
    assert resources_for(cells["n=16"], "cuda") == {"num_cpus": 2.0, "num_gpus": 0.5}
    forced = _cells("quick", ["tasks.identity.resources={num_gpus = 1}"], tasks=("identity",))
    assert {c.resources["num_gpus"] for c in forced} == {1.0}  # --set wins over the plugin's default


@pytest.mark.parametrize(
    ("resources", "message"),
    [
        ("{num_gpus = 1.5}", "num_gpus = 1.5 must be a fraction of one GPU (0 to 1) or a whole number"),
        ("{num_cpus = 0}", "num_cpus = 0 must be positive"),
        ("{memory = 4}", "unknown key 'memory'; known: num_cpus, num_gpus"),
        ("{num_gpus = nan}", "num_gpus = nan must be a finite number"),
    ],
)
def test_bad_resources_are_config_errors(resources, message):
    with pytest.raises(ConfigError, match="resources") as caught:
        _cells("quick", [f"tasks.identity.resources={resources}"], tasks=("identity",))
    assert message in str(caught.value)
