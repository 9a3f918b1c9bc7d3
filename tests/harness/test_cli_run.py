"""The real CLI into a real sqlite MLflow store: layout, resume, failure isolation, reproducibility."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch

from harness.cli import main

TINY = [
    "--task", "identity",
    "--set", "tasks.identity.variants=[{n = 4}]",
    "--set", "tuning.trials=0",  # one cell per configuration, no tuning trials
    "--set", "tasks.identity.steps=30",
    "--set", "tasks.identity.eval_every=10",
    "--set", "tasks.identity.eval_samples=200",
    "--set", "tasks.identity.snapshots=[0, 30]",
    "--no-progress",
]


def _runs(home, **filters):
    mlflow.set_tracking_uri(f"sqlite:///{home / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["sparsebench-quick"], output_format="pandas")
    for key, value in filters.items():
        runs = runs[runs[f"tags.sparsebench.{key}"] == value]
    return runs


def test_tiny_matrix_logs_parent_children_params_tags_metrics(home, third_party):
    code = main(["run", *TINY, "--estimator", "dense,scaled,gumbel_sinkhorn", "--plugin", third_party])
    assert code == 0
    runs = _runs(home)
    parents = runs[runs["tags.sparsebench.role"] == "matrix"]
    cells = runs[runs["tags.sparsebench.role"] == "cell"]
    assert len(parents) == 1
    assert set(cells["tags.mlflow.parentRunId"]) == {parents["run_id"].iloc[0]}
    assert set(cells["tags.mlflow.runName"]) == {
        "identity/n=4/dense/seed=0",
        "identity/n=4/scaled/seed=0",
        "identity/n=4/gumbel_sinkhorn/seed=0",
    }
    dense = cells[cells["tags.sparsebench.estimator"] == "dense"].iloc[0]
    assert dense["status"] == "FINISHED"
    assert dense["tags.sparsebench.status"] == "finished"
    assert dense["tags.sparsebench.kind"] == "sparse_matrix"
    assert dense["params.task.n"] == "4"
    assert dense["params.task.steps"] == "30"
    assert dense["params.seed"] == "0"
    assert dense["tags.sparsebench.torch"] == torch.__version__
    assert dense["tags.sparsebench.device"] == "cpu"
    assert len(dense["tags.sparsebench.cell_id"]) == 16
    assert dense["metrics.test/mse"] >= 0
    assert 0 <= dense["metrics.test/rows_correct"] <= 1
    assert dense["metrics.summary/wall_s"] > 0
    # Gumbel-Sinkhorn serves identity through the permutation kind.
    gs = cells[cells["tags.sparsebench.estimator"] == "gumbel_sinkhorn"].iloc[0]
    assert gs["tags.sparsebench.kind"] == "permutation"
    history = mlflow.MlflowClient().get_metric_history(dense["run_id"], "test/mse")
    assert [m.step for m in history] == [0, 10, 20, 30]
    scaled = cells[cells["tags.sparsebench.estimator"] == "scaled"].iloc[0]
    # W = a I starts at a = 0.2 (eval MSE 0.64); training must have lowered it.
    first = mlflow.MlflowClient().get_metric_history(scaled["run_id"], "test/mse")[0].value
    assert scaled["metrics.test/mse"] < first


def test_second_run_skips_finished_and_force_reruns(home):
    args = ["run", *TINY, "--estimator", "dense"]
    assert main(args) == 0
    assert main(args) == 0
    assert len(_runs(home, role="cell")) == 1  # skipped: no new child run
    assert main([*args, "--force"]) == 0
    cells = _runs(home, role="cell")
    assert len(cells) == 2
    # Reproducible: the same cell gives the same eval metric.
    assert cells["metrics.test/mse"].iloc[0] == pytest.approx(cells["metrics.test/mse"].iloc[1], rel=1e-6)


def test_failed_and_diverged_cells_do_not_stop_the_matrix(home, third_party):
    code = main(["run", *TINY, "--estimator", "exploding,diverging,scaled", "--plugin", third_party])
    assert code == 1  # a failed cell makes the exit code non-zero
    cells = _runs(home, role="cell").set_index("tags.sparsebench.estimator")
    assert cells.loc["exploding", "tags.sparsebench.status"] == "failed"
    assert cells.loc["exploding", "status"] == "FAILED"
    assert "boom" in cells.loc["exploding", "tags.sparsebench.reason"]
    assert cells.loc["diverging", "tags.sparsebench.status"] == "diverged"
    assert cells.loc["scaled", "tags.sparsebench.status"] == "finished"
    client = mlflow.MlflowClient()
    artifacts = [a.path for a in client.list_artifacts(cells.loc["exploding", "run_id"])]
    assert "traceback.txt" in artifacts
    text = client.download_artifacts(cells.loc["exploding", "run_id"], "traceback.txt")
    assert "RuntimeError: boom" in Path(text).read_text()


def test_interrupted_cell_is_killed_then_resumed(home, third_party, monkeypatch):
    args = ["run", *TINY, "--estimator", "scaled,interrupting", "--plugin", third_party]
    monkeypatch.setenv("SB_TEST_INTERRUPT", "1")
    assert main(args) == 130
    cells = _runs(home, role="cell").set_index("tags.sparsebench.estimator")
    assert cells.loc["interrupting", "status"] == "KILLED"
    assert cells.loc["scaled", "status"] == "FINISHED"
    assert (_runs(home, role="matrix")["status"] == "KILLED").all()
    monkeypatch.delenv("SB_TEST_INTERRUPT")
    assert main(args) == 0
    cells = _runs(home, role="cell")
    finished = cells[cells["status"] == "FINISHED"]["tags.sparsebench.estimator"].tolist()
    assert sorted(finished) == ["interrupting", "scaled"]  # only the killed cell ran again


def test_snapshot_artifacts_and_config_are_logged(home):
    assert main(["run", *TINY, "--estimator", "sparse"]) == 0
    cell = _runs(home, role="cell").iloc[0]
    client = mlflow.MlflowClient()
    top = {a.path for a in client.list_artifacts(cell["run_id"])}
    assert {"config.json", "snapshots"} <= top
    steps = {a.path for a in client.list_artifacts(cell["run_id"], "snapshots")}
    assert steps == {"snapshots/step=0", "snapshots/step=30"}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_runs_on_each_device(home, device):
    assert main(["run", *TINY, "--estimator", "dense,sparse", "--device", device]) == 0
    cells = _runs(home, role="cell")
    assert set(cells["tags.sparsebench.device"]) == {device if device == "cpu" else "cuda"}
    assert (cells["tags.sparsebench.status"] == "finished").all()
