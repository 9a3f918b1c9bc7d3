"""Gradient diagnostics (``harness.run.diagnostics``): their statistics against a direct computation,
the crux that the sampling draws hold the batch fixed and the batch draws the sampling, and that a
cell trains bit-identically with them on and off, on real short runs of every built-in task; then
the ``[diagnostics]`` table through the CLI (metrics and tag in a real store, bad values exit 2)."""

from __future__ import annotations

import itertools
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from harness import plugins
from harness.cli import main
from harness.matrix import choose_kind
from harness.run.cell import seed_everything
from harness.run.diagnostics import Diagnose, Diagnostics, gradient_statistics
from harness.run.loop import Hooks, Loop
from harness.task import CellSetup

REGISTRY = plugins.load()


def test_statistics_match_a_direct_computation():
    rng = np.random.default_rng(0)
    g = rng.normal(size=(6, 5)) + np.array([1.0, -2.0, 0.0, 0.5, 3.0])
    g[:, 2] = 0.25  # a coordinate that never varies: left out of the SNR
    stats = gradient_statistics(torch.tensor(g))
    mean, var = g.mean(0), g.var(0, ddof=1)
    assert stats["trace"] == pytest.approx(var.sum(), rel=1e-12)
    assert stats["rel_var"] == pytest.approx(var.sum() / (mean @ mean), rel=1e-12)
    keep = var > 0
    assert stats["snr"] == pytest.approx(np.mean(np.abs(mean[keep]) / np.sqrt(var[keep])), rel=1e-12)
    unit = g / np.linalg.norm(g, axis=1, keepdims=True)
    pairs = [unit[i] @ unit[j] for i, j in itertools.combinations(range(6), 2)]
    assert stats["cosine"] == pytest.approx(np.mean(pairs), rel=1e-12)


def test_undefined_statistics_are_left_out_not_inf():
    same = gradient_statistics(torch.ones(4, 3, dtype=torch.float64))
    assert same["trace"] == 0.0 and same["rel_var"] == 0.0 and same["cosine"] == pytest.approx(1.0)
    assert "snr" not in same  # nothing varies: the ratio is undefined
    zero = gradient_statistics(torch.zeros(4, 3, dtype=torch.float64))
    assert set(zero) == {"trace", "mean_norm"}


class _Record(Hooks):
    def __init__(self) -> None:
        self.rows: list[tuple[str, int, dict[str, float]]] = []
        self.grads: dict[int, dict[str, float]] = {}
        self.rng = torch.empty(0)

    def trained(self, step: int, loss: float, metrics: dict[str, float]) -> None:
        self.rows.append(("train", step, {"train/objective": loss, **metrics}))

    def evaluated(self, step: int, metrics: dict[str, float]) -> None:
        self.rows.append(("eval", step, metrics))

    def diagnosed(self, step: int, metrics: dict[str, float]) -> None:
        self.grads[step] = metrics


def _train(task_name: str, est_name: str, cache: Path, diagnose: Diagnose, steps: int = 4):
    task, est = REGISTRY.task(task_name), REGISTRY.estimator(est_name)
    params = {**task.defaults, **task.smoke, "steps": steps, "eval_every": 2, "snapshots": []}
    est_params = dict(est.defaults)
    kind, spec, reason = choose_kind(task, est, params, est_params)
    assert kind is not None, reason
    seed_everything(3)
    layer = est.build(spec, est_params)
    run = task.setup(CellSetup(params, layer, kind, torch.device("cpu"), 3, cache, spec))
    hooks = _Record()
    loop = Loop(run, params["lr"], hooks, Diagnostics(diagnose, 3) if diagnose.on else None)
    loop.train()
    hooks.rng = torch.get_rng_state()  # where the global stream stands after training
    return hooks, run, loop


PAIRS = [
    ("identity", "sparse"),
    ("identity", "reinforce"),
    ("identity", "gumbel_sinkhorn"),
    ("identity", "dense"),
    ("attention", "sparse"),
    ("attention", "reinforce"),
    ("attention", "bilinear"),
    ("sorting", "sparse"),
    ("sorting", "reinforce"),
    ("sorting", "gumbel_sinkhorn"),
    ("sorting", "dense"),
]


@pytest.mark.parametrize(("task", "estimator"), PAIRS)
def test_training_is_bit_identical_with_diagnostics_on_and_off(task, estimator, tmp_path):
    off, run_off, loop_off = _train(task, estimator, tmp_path, Diagnose())
    on, run_on, loop_on = _train(task, estimator, tmp_path, Diagnose(every=1, draws=3))
    assert on.rows == off.rows  # every training and evaluation metric, exactly
    assert sorted(on.grads) == [0, 1, 2, 3] and not off.grads
    for a, b in zip(run_off.model.state_dict().values(), run_on.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    state_off, state_on = loop_off.optimiser.state_dict(), loop_on.optimiser.state_dict()
    for key, value in state_off["state"].items():
        for name, tensor in value.items():
            assert torch.equal(tensor, state_on["state"][key][name])
    assert torch.equal(on.rng, off.rng)
    assert all(g["time/diagnostics_s"] > 0 for g in on.grads.values())
    assert all(np.isfinite(v) for g in on.grads.values() for v in g.values())


def test_a_layer_that_draws_nothing_shows_no_sampling_noise_only_batch_noise(tmp_path):
    """The dense layer is deterministic: the sampling draws see one batch, so they agree exactly,
    and the batch draws see different batches, so they do not."""
    hooks, _, _ = _train("identity", "dense", tmp_path, Diagnose(every=2, draws=4))
    for grads in hooks.grads.values():
        assert grads["grad/all/var_sampling"] == 0.0
        assert grads["grad/all/var_batch"] > 0.0
        assert grads["grad/all/sampling_share"] == 0.0
        assert grads["grad/all/cosine"] == pytest.approx(1.0)


def test_a_sampling_layer_varies_over_sampling_at_one_batch(tmp_path):
    hooks, _, _ = _train("identity", "reinforce", tmp_path, Diagnose(every=2, draws=4))
    for grads in hooks.grads.values():
        assert grads["grad/layer/var_sampling"] > 0.0 and 0.0 < grads["grad/layer/sampling_share"] < 1.0
        assert grads["grad/layer/cosine"] < 0.9


def test_the_structure_layers_own_parameters_are_a_group_of_their_own(tmp_path):
    hooks, run, _ = _train("attention", "sparse", tmp_path, Diagnose(every=2, draws=3), steps=2)
    (grads,) = hooks.grads.values()
    assert {"grad/all/var_sampling", "grad/layer/var_sampling"} <= set(grads)
    # the layer's parameters are a part of the model's, so their variance is a part of the whole
    assert grads["grad/layer/var_sampling"] <= grads["grad/all/var_sampling"]


def _cli(*extra: str) -> list[str]:
    return [
        "run", "--task", "identity", "--estimator", "reinforce", "--no-progress", "--threads", "1",
        "--set", "tasks.identity.variants=[{n = 4}]", "--set", "tasks.identity.steps=20",
        "--set", "tasks.identity.eval_every=10", "--set", "tasks.identity.eval_samples=64",
        "--set", "tasks.identity.snapshots=[]", "--set", "tuning.trials=0", *extra,
    ]  # fmt: skip


def test_the_cli_logs_the_measurements_and_leaves_the_training_metrics_alone(
    home, seeded, tmp_path, store_at, monkeypatch
):
    histories = {}
    settings = ("--set", "diagnostics.every=10", "--set", "diagnostics.draws=3")
    for label, extra in (("off", ("--set", "diagnostics.every=0")), ("on", settings)):  # quick's is on
        where = seeded(tmp_path / label)
        monkeypatch.setenv("SPARSEBENCH_HOME", str(where))
        assert main(_cli(*extra)) == 0
        store = store_at(where)
        run = store.cell()
        client = store.client
        histories[label] = {
            key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            for key in run.data.metrics
        }
        histories[label + "_tags"] = run.data.tags
    on, off = histories["on"], histories["off"]
    measured = {k for k in on if k.startswith("grad/")}
    assert {"grad/all/rel_var", "grad/all/snr", "grad/all/cosine", "grad/all/sampling_share"} <= measured
    assert [s for s, _ in on["grad/all/rel_var"]] == [0, 10]
    assert [s for s, _ in on["time/diagnostics_s"]] == [0, 10]
    steady = {k for k in off if not k.startswith(("time/", "summary/"))}
    assert steady and all(on[k] == off[k] for k in steady)
    assert histories["on_tags"]["sparsebench.diagnostics"] == "every=10 draws=3"
    assert histories["on_tags"]["sparsebench.cell_id"] == histories["off_tags"]["sparsebench.cell_id"]
    assert "sparsebench.diagnostics" not in histories["off_tags"]


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("diagnostics.every=-1", "[diagnostics] every = -1 must be an integer >= 0"),
        ("diagnostics.draws=1", "[diagnostics] draws = 1 must be an integer >= 2"),
        ("diagnostics.every=1.5", "[diagnostics] every = 1.5 must be an integer >= 0"),
        ("diagnostics.often=3", "[diagnostics]: unknown key 'often'; known: every, draws"),
    ],
)
def test_a_bad_diagnostics_value_is_one_line_and_exit_2(setting, message, store_home, capsys):
    assert main(_cli("--set", setting, "--dry-run")) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_a_resumed_cell_measures_and_trains_as_an_uninterrupted_one(
    probe, tmp_path, monkeypatch, capsys, store_at, seeded
):
    """Diagnostics on, a signal mid-cell, a resume: every training, evaluation and ``grad/``
    value equals the uninterrupted cell's, each step logged once."""
    args = [
        "run", "--task", "identity", "--estimator", "sparse_probe", "--plugin", "sb_probe",
        "--no-progress", "--threads", "1", "--checkpoint-steps", "10",
        "--set", "tasks.identity.variants=[{n = 8}]", "--set", "tasks.identity.steps=60",
        "--set", "tasks.identity.eval_every=20", "--set", "tasks.identity.eval_samples=200",
        "--set", "tasks.identity.snapshots=[]",
        "--set", "diagnostics.every=15", "--set", "diagnostics.draws=2", "--set", "tuning.trials=0",
    ]  # fmt: skip
    monkeypatch.setenv("SPARSEBENCH_HOME", str(seeded(tmp_path / "reference")))
    assert main(args) == 0
    reference = store_at(tmp_path / "reference")
    expected = reference.history(reference.cell().info.run_id)
    assert [s for s, _ in expected["grad/all/rel_var"]] == [0, 15, 30, 45]

    home = seeded(tmp_path / "resumed")
    monkeypatch.setenv("SPARSEBENCH_HOME", str(home))
    monkeypatch.setenv("SB_PROBE_SIGNAL", "SIGTERM:50")  # a training forward past step 30's measurement
    assert main(args) == 128 + signal.SIGTERM
    stopped = int(store_at(home).cell().data.tags["sparsebench.checkpoint_step"])
    assert 30 < stopped < 45  # measured at 30 before the signal, at 45 only after the resume
    monkeypatch.delenv("SB_PROBE_SIGNAL")
    assert main(args) == 0
    capsys.readouterr()
    store = store_at(home)
    assert store.history(store.cell().info.run_id) == expected
