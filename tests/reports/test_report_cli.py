"""`sparsebench run` then `sparsebench report` through the real CLI, into one sqlite store."""

from __future__ import annotations

import mlflow

from harness.cli import main

TINY = [
    "--task",
    "identity",
    "--estimator",
    "sparse,dense,bilinear",
    "--set",
    "tasks.identity.variants=[{n = 4}]",
    "--set",
    "tuning.trials=0",  # one cell per configuration
    "--set",
    "tasks.identity.steps=20",
    "--set",
    "tasks.identity.eval_every=10",
    "--set",
    "tasks.identity.eval_samples=100",
    "--set",
    "tasks.identity.snapshots=[0, 20]",
    "--no-progress",
]


def test_report_after_a_run_writes_figures_and_logs_a_report_run(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    monkeypatch.setenv("SPARSEBENCH_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["run", *TINY]) == 0
    assert main(["report"]) == 0
    assert str(home / "report" / "index.html") in capsys.readouterr().out
    out = home / "report"
    for name in ("index.html", "frame.csv", "frame.parquet", "fig2_identity.png", "fig3_identity_layer.svg"):
        assert (out / name).exists(), name
    page = (out / "index.html").read_text()
    assert "embedded" in page.lower() or "identity" in page  # provenance or at least the task
    assert "no runs yet" in page  # attention and sorting have no runs in this store
    mlflow.set_tracking_uri(f"sqlite:///{home / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True)
    reports = runs[runs["tags.sparsebench.role"] == "report"]
    assert len(reports) == 1
    na = runs[runs["tags.sparsebench.status"] == "n/a"]
    assert na["tags.mlflow.runName"].tolist() == ["identity/n=4/bilinear/seed=0"]
    assert (tmp_path / "mlruns").exists() is False


def test_report_on_an_absent_store_is_a_usage_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPARSEBENCH_HOME", str(tmp_path / "nothing"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["report"]) == 2
    err = capsys.readouterr().err
    assert "nothing" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "nothing" / "mlflow.db").exists()
