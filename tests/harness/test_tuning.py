"""The tuning ruleset (``[tuning]``, ``harness.tuning``) and the search spaces plugins declare
(``estimators.params``): resolution and its errors through the real CLI, the same trials from the
same config, exactly ``trials`` per estimator (a third-party one included), ``--params``, and
trial cells that run, skip and resume in a real store like any cell."""

from __future__ import annotations

import json
import math

import pytest

from estimators.params import Choice, Range, space_problems
from harness import config
from harness.cli import main
from harness.errors import ConfigError
from harness.matrix import Selection, resolve_cells
from harness.plugins import load
from harness.tuning import Axis, Ruleset, draw, read_ruleset
from plugins.gradient_study import GradientStudy
from reports import schema

REGISTRY = load()

# a third-party estimator declaring a space: two dimensions, one of them only for permutations
SPACED = '''
from torch import nn
import torch

from estimators.base import Estimator, StructureLayer, hookimpl
from estimators.params import Range


class Scaled(StructureLayer):
    def __init__(self, spec, start):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(start))

    def forward(self, x):
        return self.a * x


class Spaced(Estimator):
    name = "spaced"
    description = "test: W = a I, with a search space"
    kinds = frozenset({"sparse_matrix"})
    defaults = {"start": 0.2, "width": 2, "mode": "a"}
    space = {"start": Range(0.05, 0.8, "log"), "width": Range(1, 8), "mode": ["a", "b"]}

    def build(self, spec, params):
        return Scaled(spec, params["start"])


@hookimpl
def register_estimators(register):
    register(Spaced())
'''

TINY = [
    "--task", "identity",
    "--set", "tasks.identity.variants=[{n = 4}]",
    "--set", "tasks.identity.steps=20",
    "--set", "tasks.identity.eval_every=10",
    "--set", "tasks.identity.eval_samples=100",
    "--set", "tasks.identity.snapshots=[]",
    "--no-progress",
]


def _cells(sets: list[str], registry=REGISTRY, **selection):
    raw = config.load_config("quick", None, sets)
    return resolve_cells(raw, registry, Selection(**selection), forced=config.set_layer(sets))


def _trials(cells, estimator: str) -> list[dict]:
    return [c.trial_values for c in cells if c.estimator == estimator]


# ---- the ruleset and the trials it draws --------------------------------------------------------


def test_same_config_same_trials_and_the_seed_changes_them():
    sets = ["tuning.trials=5", "tuning.method='quasirandom'"]
    first = _cells(sets, tasks=("sorting",), seeds=(0,))
    again = _cells(sets, tasks=("sorting",), seeds=(0,))
    assert [(c.cell_id, c.sweep, c.trial_values) for c in first] == [
        (c.cell_id, c.sweep, c.trial_values) for c in again
    ]
    other = _cells([*sets, "tuning.seed=7"], tasks=("sorting",), seeds=(0,))
    assert _trials(first, "reinforce") != _trials(other, "reinforce")
    # the same space and seed give the same points: lr is the first dimension of every space
    lrs = {est: [t["task.lr"] for t in _trials(first, est)] for est in ("sparse", "reinforce", "dense")}
    assert lrs["sparse"] == lrs["reinforce"] == lrs["dense"]


@pytest.mark.parametrize("method", ["grid", "quasirandom"])
@pytest.mark.parametrize("trials", [1, 3, 6])
def test_every_runnable_estimator_gets_exactly_trials_distinct_trials(method, trials, plugin_dir):
    plugin_dir("sb_spaced", SPACED)
    registry = load(["sb_spaced"])
    cells = _cells([f"tuning.trials={trials}", f"tuning.method='{method}'"], registry, seeds=(0, 1))
    by_entry: dict[tuple, list] = {}
    for cell in cells:
        by_entry.setdefault((cell.task, cell.variant, cell.estimator, cell.seed), []).append(cell)
    runnable = {k: v for k, v in by_entry.items() if v[0].na_reason is None}
    assert ("identity", "n=8", "spaced", 0) in runnable  # the third-party estimator is in the matrix
    for entry, group in runnable.items():
        assert len(group) == trials, entry
        assert sorted(c.trial for c in group) == list(range(trials))
        assert len({json.dumps(c.trial_values, sort_keys=True) for c in group}) == trials
        assert len({c.cell_id for c in group}) == trials
        for cell in group:  # the values are in the params (so in the id) and in the name
            for key, value in cell.trial_values.items():
                scope, _, name = key.partition(".")
                params = cell.task_params if scope == "task" else cell.estimator_params
                assert params[name] == value
                assert f"{name}={value}" in cell.sweep
            assert json.loads(cell.tuning)["trials"] == trials
    # n/a cells stay one cell each: nothing of theirs runs
    assert all(len(v) == 1 for k, v in by_entry.items() if k not in runnable)


def test_spaces_of_the_cell_task_and_estimator_kind_and_pins():
    cells = _cells(["tuning.trials=2"], seeds=(0,))
    keys = {(c.task, c.variant, c.estimator): sorted(c.trial_values) for c in cells if c.trial is not None}
    assert keys[("identity", "n=8", "dense")] == ["task.lr"]  # NeuralSort's tau: permutations only
    assert keys[("sorting", "n=4", "dense")] == ["estimator.tau", "task.lr"]
    assert keys[("identity", "n=8", "gumbel_sinkhorn")] == ["estimator.temperature", "task.lr"]
    # quick pins the paper's sampling counts (A.1) for sparse on identity and attention
    assert keys[("identity", "n=8", "sparse")] == ["task.lr"]
    assert {c.estimator_params["a_l"] for c in cells if c.task == "identity" and c.variant == "n=8"
            and c.estimator == "sparse"} == {1}
    # a --set pins too: lr is then the same in every trial and not searched
    pinned = _cells(["tuning.trials=2", "tasks.sorting.lr=0.001"], tasks=("sorting",), seeds=(0,))
    assert {c.task_params["lr"] for c in pinned} == {0.001}
    assert {c.estimator: c.trial for c in pinned if c.estimator in ("sparse", "reinforce")} == {
        "sparse": None, "reinforce": None
    }  # nothing left to search: one plain cell


def test_an_estimator_table_pins_and_a_task_table_is_the_untuned_start():
    raw = config.load_config("quick", None, ["tuning.trials=3"])
    raw["estimators"] = {"gumbel_sinkhorn": {"temperature": 2.0}}
    cells = resolve_cells(raw, REGISTRY, Selection(("sorting",), ("gumbel_sinkhorn",)))
    assert len(cells) == 3 and all(sorted(c.trial_values) == ["task.lr"] for c in cells)
    assert {c.estimator_params["temperature"] for c in cells} == {2.0}
    assert len({c.task_params["lr"] for c in cells}) == 3  # quick's [tasks.sorting] lr is searched
    raw["estimators"] = {"gumbel_sinkhorn": {"temperature": 3.0}}  # not on Grover et al.'s grid
    with pytest.raises(ConfigError, match="temperature = 3.0 is outside its search space"):
        resolve_cells(raw, REGISTRY, Selection(("sorting",), ("gumbel_sinkhorn",)))


def test_grid_and_quasirandom_points():
    lr = Axis("task.lr", Range(1e-4, 1e-1, "log"), 0.005)
    tau = Axis("estimator.tau", Choice((1.0, 2.0, 4.0, 8.0, 16.0)), 1.0)
    count = Axis("estimator.a", Range(1, 32, "log"), 2)
    grid = Ruleset(trials=4, method="grid")
    assert [p["task.lr"] for p in draw("t", [lr], grid)] == pytest.approx([1e-4, 1e-3, 1e-2, 1e-1])
    five = draw("t", [tau], Ruleset(trials=5, method="grid"))
    assert [p["estimator.tau"] for p in five] == [1.0, 2.0, 4.0, 8.0, 16.0]
    three = draw("t", [tau], Ruleset(trials=3, method="grid"))
    assert [p["estimator.tau"] for p in three] == [1.0, 4.0, 16.0]  # spread evenly through the grid
    points = draw("t", [lr, tau, count], Ruleset(trials=12))
    assert len(points) == 12 and len({json.dumps(p) for p in points}) == 12
    for p in points:
        assert 1e-4 <= p["task.lr"] <= 1e-1 and p["estimator.tau"] in tau.dim.values
        assert isinstance(p["estimator.a"], int) and 1 <= p["estimator.a"] <= 32
        assert p["task.lr"] == float(f"{p['task.lr']:.3g}")  # three significant digits
    # a log range spreads on the log scale: half the points below the geometric middle
    many = draw("t", [lr], Ruleset(trials=64))
    assert sum(p["task.lr"] < math.sqrt(1e-4 * 1e-1) for p in many) == 32
    with pytest.raises(ConfigError, match="holds only 5 distinct points, fewer than"):
        draw("t", [tau], Ruleset(trials=6))
    with pytest.raises(ConfigError, match="holds only 5 distinct points"):
        draw("t", [tau], Ruleset(trials=6, method="grid"))


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"trials": -1}, "[tuning] trials = -1 must be an integer >= 0"),
        ({"method": "grid"}, "[tuning]: trials is missing"),
        ({"trials": 2, "method": "random"}, "[tuning] method = 'random' is not one of grid, quasirandom"),
        ({"trials": 2, "budget": 3}, "[tuning]: unknown key 'budget'"),
        ({"trials": 2, "select": {"metric": "test/mse"}}, "must be a validation metric (val/...)"),
        ({"trials": 2, "select": {"metric": "eval/mse"}}, "trials are never chosen on test data"),
        ({"trials": 2, "select": {"direction": "up"}}, "direction = 'up' is not one of min, max"),
    ],
)
def test_bad_tuning_tables_are_config_errors(table, message):
    with pytest.raises(ConfigError) as e:
        read_ruleset({"tuning": table})
    assert message in str(e.value)


def test_no_table_or_zero_trials_is_no_tuning():
    assert read_ruleset({}) is None and read_ruleset({"tuning": {"trials": 0}}) is None
    cells = _cells(["tuning.trials=0"], tasks=("identity",), seeds=(0,))
    assert all(c.trial is None and c.sweep == "" for c in cells)
    rules = read_ruleset({"tuning": {"trials": 3, "select": {"direction": "max"}}})
    assert json.loads(rules.record("val/mse")) == {
        "trials": 3, "method": "quasirandom", "seed": 0, "metric": "val/mse", "direction": "max"
    }


# ---- spaces: what a plugin declares -------------------------------------------------------------


def test_builtin_spaces_are_well_formed():
    for reg in [*REGISTRY.tasks.values(), *REGISTRY.estimators.values()]:
        assert space_problems(reg.obj) == [], reg.obj.name
    # every task that trains searches its optimiser's rate; the gradient study's tasks take no step
    trained = [reg.obj for reg in REGISTRY.tasks.values() if not isinstance(reg.obj, GradientStudy)]
    assert trained and all("lr" in task.space for task in trained)


BAD_SPACES = [
    ('{"start": Range(0.8, 0.05)}', "space start: low 0.8 must be below high 0.05"),
    ('{"start": Range(0.0, 1.0, "log")}', "space start: a log scale needs low > 0"),
    ('{"start": Range(0.05, 0.8, "cubic")}', "space start: scale 'cubic' must be one of linear, log"),
    ('{"start": Range(0.3, 0.8)}', "space start: the default 0.2 lies outside it ([0.3, 0.8] linear)"),
    ('{"mode": Range(1, 2)}', "space mode: a range needs a numeric default, not 'a'"),
    ('{"mode": ["a", 3]}', "space mode: 3 is not a str like its default 'a'"),
    ('{"mode": []}', "space mode: the list of values is empty"),
    ('{"nosuch": [1, 2]}', "space names 'nosuch', which is not among the defaults"),
    ('{"start": 0.5}', "space start: 0.5 must be a Range, a Choice or a list of values"),
]


def _bad_plugin(space: str) -> str:
    line = '{"start": Range(0.05, 0.8, "log"), "width": Range(1, 8), "mode": ["a", "b"]}'
    return SPACED.replace(line, space, 1)


@pytest.mark.parametrize(("space", "message"), BAD_SPACES)
def test_a_bad_space_is_one_line_and_exit_2(plugin_dir, home, capsys, space, message):
    plugin_dir("sb_bad_space", _bad_plugin(space))
    assert main(["list", "--plugin", "sb_bad_space", "--task", "identity"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "estimator 'spaced'" in err and message in err, err


def test_check_plugin_checks_the_space(plugin_dir, home, capsys):
    plugin_dir("sb_bad_space", _bad_plugin(BAD_SPACES[0][0]))
    assert main(["check-plugin", "--plugin", "sb_bad_space"]) == 1
    out = capsys.readouterr().out
    assert "  FAIL  registration: space start: low 0.8 must be below high 0.05" in out


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["tasks.identity.lr=0.5"],
         "identity/n=4/dense: lr = 0.5 is outside its search space ([0.0001, 0.1] log)"),
        (["overrides=[{match = {task = 'identity'}, sweep = {'task.lr' = [0.1, 0.01]}}]"],
         "[[overrides]] #4 sweep: [tuning] already searches each cell's space"),
        (["tuning.method='halton'"], "[tuning] method = 'halton' is not one of grid, quasirandom"),
    ],
)
def test_resolution_errors_exit_2(home, capsys, sets, message):
    args = ["list", *TINY[:4], "--estimator", "dense", "--set", "tuning.trials=2"]
    assert main([*args, *(a for s in sets for a in ("--set", s))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


# ---- --params -----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["list"], ["run", "--dry-run"]])
def test_params_show_each_cells_resolved_parameters_and_trial(home, capsys, command):
    tiny = [a for a in TINY if a != "--no-progress"]  # a run option
    args = [*command, "--params", *tiny, "--estimator", "gumbel_sinkhorn", "--set", "tuning.trials=2"]
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    sets = [s for s in TINY if "=" in s]
    cells = _cells([*sets, "tuning.trials=2"], tasks=("identity",), estimators=("gumbel_sinkhorn",))
    assert len(cells) == 2
    for cell in cells:
        at = out.index(f"{cell.name}  {cell.cell_id}")
        lr, temperature = cell.task_params["lr"], cell.estimator_params["temperature"]
        assert out[at + 1] == f"  trial      {cell.trial}: lr={lr} temperature={temperature}"
        assert out[at + 2] == (
            f"  task       n=4 steps=20 eval_every=10 lr={lr} batch_size=64 eval_samples=100 "
            "snapshots=[] stop_after=0"
        )
        assert out[at + 3] == f"  estimator  temperature={temperature} iterations=20 noise=1.0 samples=1"
    assert not (home / "mlflow.db").exists()  # nothing written


def test_params_needs_dry_run(home, capsys):
    assert main(["run", "--params", *TINY, "--estimator", "dense"]) == 2
    assert "add --dry-run" in capsys.readouterr().err


# ---- trials run, skip and resume like cells ----------------------------------------------------


def test_trial_cells_run_skip_and_resume_in_a_real_store(home, store, third_party, monkeypatch):
    args = ["run", *TINY, "--estimator", "interrupting", "--plugin", third_party, "--set", "tuning.trials=2"]
    monkeypatch.setenv("SB_TEST_INTERRUPT", "1")
    assert main(args) == 130  # the first trial is killed mid-cell, the matrix with it
    (killed,) = store.runs("cell")
    assert killed.info.status == "KILLED" and killed.data.tags[schema.TRIAL_TAG] in ("0", "1")
    monkeypatch.delenv("SB_TEST_INTERRUPT")
    assert main(args) == 0  # resumes the killed trial, runs the other
    runs = store.runs("cell")
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert sorted(r.data.tags[schema.TRIAL_TAG] for r in finished) == ["0", "1"]
    ids = {r.data.tags[schema.CELL_ID_TAG] for r in finished}
    assert killed.data.tags[schema.CELL_ID_TAG] in ids and len(ids) == 2
    for run in finished:
        tags = run.data.tags
        values = json.loads(tags[schema.TRIAL_VALUES_TAG])
        assert tags[schema.SWEEP_TAG].startswith(f"trial={tags[schema.TRIAL_TAG]},lr=")
        assert float(run.data.params["task.lr"]) == values["task.lr"]
        assert json.loads(tags[schema.TUNING_TAG]) == {
            "trials": 2, "method": "quasirandom", "seed": 0, "metric": "val/mse", "direction": "min"
        }
    assert main(args) == 0  # every trial finished: nothing runs again
    assert len(store.runs("cell")) == len(runs)
