"""The sparse estimator's pooled form: a parameter with checked choices, logged with every cell."""

from __future__ import annotations

import mlflow

from harness.cli import main

TINY = [
    "--task", "identity", "--estimator", "sparse",
    "--set", "tasks.identity.variants=[{n = 6}]",
    "--set", "tuning.trials=0",  # one cell per configuration, no tuning trials
    "--set", "tasks.identity.steps=12",
    "--set", "tasks.identity.eval_every=6",
    "--set", "tasks.identity.eval_samples=100",
    "--set", "tasks.identity.snapshots=[]",
    "--no-progress",
]


def _cells(home):
    mlflow.set_tracking_uri(f"sqlite:///{home / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["sparsebench-quick"], output_format="pandas")
    return runs[runs["tags.sparsebench.role"] == "cell"]


def test_every_cell_records_which_pooled_form_ran(home):
    assert main(["run", *TINY]) == 0
    assert main(["run", *TINY, "--set", "estimators.sparse.pooled=all_pairs"]) == 0
    cells = _cells(home)
    assert set(cells["status"]) == {"FINISHED"}
    assert set(cells["params.estimator.normalise"]) == {"pooled"}
    # the default is the truncated form; the reference is a separate cell, not a rerun
    assert sorted(cells["params.estimator.pooled"]) == ["all_pairs", "truncated"]
    assert cells["tags.sparsebench.cell_id"].nunique() == 2
    assert (cells["metrics.test/mse"] >= 0).all()


def test_an_unknown_pooled_form_is_refused(home, capsys):
    assert main(["run", *TINY, "--set", "estimators.sparse.pooled=fast"]) == 2
    err = capsys.readouterr().err
    assert "pooled = 'fast' is not one of 'truncated', 'all_pairs'" in err
    assert not (home / "mlflow.db").exists()
