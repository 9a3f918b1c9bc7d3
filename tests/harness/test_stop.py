"""The stop rule: a real identity cell (the sparse layer at n = 4) ends once its target (eval MSE 0,
exact I) has held for K evaluations, records where and why, trains its full budget with the rule
off, and a resume between the first solved evaluation and the stop continues the count exactly."""

from __future__ import annotations

import signal

from harness.cli import main

K = 2


def _args(stop_after: int, *extra: str) -> list[str]:
    return [
        "run", "--task", "identity", "--estimator", "sparse_probe", "--plugin", "sb_probe",
        "--no-progress", "--threads", "1",
        "--set", "tasks.identity.variants=[{n = 4}]",
        "--set", "tuning.trials=0",  # one cell per configuration, no tuning trials
        "--set", "diagnostics.every=0",  # the probe counts training forwards: gradient draws would too
        "--set", "tasks.identity.steps=600",
        "--set", "tasks.identity.eval_every=50",
        "--set", "tasks.identity.eval_samples=200",
        "--set", "tasks.identity.snapshots=[]",
        "--set", f"tasks.identity.stop_after={stop_after}",
        *extra,
    ]


def _metric(store, run, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in store.client.get_metric_history(run.info.run_id, key))


def test_a_solved_cell_stops_after_k_evaluations_and_says_why(probe, store_home, store):
    assert main(_args(K)) == 0
    run = store.cell()
    mse = _metric(store, run, "val/mse")
    solved = [step for step, value in mse if value == 0.0]
    first = solved[0]
    stopped = first + (K - 1) * 50
    assert run.data.tags["sparsebench.status"] == "finished"
    assert run.data.tags["sparsebench.target"] == "val/mse <= 0"
    assert run.data.tags["sparsebench.stopped"] == f"solved for {K} evaluations (val/mse <= 0)"
    assert mse[-1][0] == stopped < 600  # no evaluation after the stop, well short of the budget
    assert solved[-K:] == [first + 50 * i for i in range(K)]
    assert _metric(store, run, "summary/stopped_step") == [(stopped, float(stopped))]
    assert _metric(store, run, "summary/target_step") == [(first, float(first))]
    (target_step, target_wall), = _metric(store, run, "summary/target_wall_s")
    (_, wall), = _metric(store, run, "summary/wall_s")
    assert target_step == first and 0 < target_wall <= wall
    (_, rate), = _metric(store, run, "summary/steps_per_s")
    assert abs(rate - stopped / wall) < 1e-6 * rate  # the steps it took, not the budget
    assert max(step for step, _ in _metric(store, run, "train/objective")) < stopped


def test_with_the_rule_off_a_solved_cell_trains_its_full_budget(probe, store_home, store):
    assert main(_args(0)) == 0
    run = store.cell()
    mse = _metric(store, run, "val/mse")
    assert mse[-1] == (600, 0.0)  # solved long before, trained on
    assert "sparsebench.stopped" not in run.data.tags
    assert "summary/stopped_step" not in run.data.metrics
    first = next(step for step, value in mse if value == 0.0)
    assert _metric(store, run, "summary/target_step") == [(first, float(first))]  # still recorded


def test_a_resume_between_the_first_solved_evaluation_and_the_stop_stops_where_it_would_have(
    probe, tmp_path, monkeypatch, capsys, store_at, seeded
):
    args = _args(K, "--checkpoint-steps", "10")
    monkeypatch.setenv("SPARSEBENCH_HOME", str(seeded(tmp_path / "reference")))
    assert main(args) == 0
    reference_store = store_at(tmp_path / "reference")
    reference = reference_store.cell()
    first = int(reference.data.metrics["summary/target_step"])

    home = seeded(tmp_path / "resumed")
    store = store_at(home)
    monkeypatch.setenv("SPARSEBENCH_HOME", str(home))
    monkeypatch.setenv("SB_PROBE_SIGNAL", f"SIGTERM:{first + 25}")  # after 1 of the K solved evaluations
    assert main(args) == 128 + signal.SIGTERM
    killed_at = int(store.cell().data.tags["sparsebench.checkpoint_step"])
    assert first < killed_at < first + 50
    monkeypatch.delenv("SB_PROBE_SIGNAL")
    capsys.readouterr()
    assert main(args) == 0
    resumed = store.cell()
    assert resumed.data.tags["sparsebench.resumes"] == "1"
    assert resumed.data.tags["sparsebench.stopped"] == reference.data.tags["sparsebench.stopped"]
    for key in ("summary/stopped_step", "summary/target_step"):
        assert _metric(store, resumed, key) == _metric(reference_store, reference, key)
    assert store.history(resumed.info.run_id) == reference_store.history(reference.info.run_id)


def test_the_summary_and_the_report_say_where_and_why_a_cell_stopped(probe, store_home, store, capsys):
    from reports.frame import read_store
    from reports.tables import matrix_summary

    assert main(_args(K)) == 0
    stopped = int(store.cell().data.metrics["summary/stopped_step"])
    note = f"stopped at step {stopped}: solved for {K} evaluations (val/mse <= 0)"
    assert f"stopped at step {stopped}" in capsys.readouterr().out  # the run's own summary table
    summary = matrix_summary(read_store(store.uri, ["sparsebench-quick"]).runs)
    assert summary["stopped"].tolist() == [f"seed 0 {note}"]
