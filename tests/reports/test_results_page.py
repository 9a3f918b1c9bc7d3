"""`sparsebench report --results PAGE`: the committed results page, from real stores written by
real identity cells, its power-law fit, and its one-line errors."""

from __future__ import annotations

import re

import numpy as np
import pytest

from harness.cli import main
from reports.results import fit_power_law

RUN = [
    "run", "--task", "identity", "--estimator", "sparse", "--no-progress", "--threads", "1",
    "--set", "tasks.identity.variants=[{n = 4}, {n = 8}]",
    "--set", "tuning.trials=0",  # one cell per configuration, no tuning trials
    "--set", "tasks.identity.steps=1500",
    "--set", "tasks.identity.eval_every=50",
    "--set", "tasks.identity.eval_samples=200",
    "--set", "tasks.identity.snapshots=[]",
    "--set", "tasks.identity.stop_after=2",
]


def test_the_power_law_fit_recovers_a_known_exponent():
    n = np.array([4, 8, 16, 32, 64, 4, 8, 16])
    fit = fit_power_law(n, 3.0 * n**1.5)
    assert fit is not None and fit.points == 8
    assert fit.b == pytest.approx(1.5, abs=1e-9) and fit.a == pytest.approx(3.0, rel=1e-9)
    noisy = fit_power_law([8, 16, 32, 64], [100 * 1.1, 400 / 1.1, 1600 * 1.1, 6400 / 1.1])
    assert noisy is not None and noisy.b == pytest.approx(2.0, abs=0.1)
    assert fit_power_law([16, 16], [300, 500]) is None  # one size: no growth to fit


def test_the_results_page_from_a_real_store_lists_its_tables_fit_and_figures(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    monkeypatch.setenv("SPARSEBENCH_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(RUN) == 0
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    cells = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "tags.`sparsebench.role` = 'cell'"
    )
    targets = {int(r.data.params["task.n"]): r.data.metrics["summary/target_step"] for r in cells}
    assert sorted(targets) == [4, 8]
    runs_before = len(client.search_runs([e.experiment_id for e in client.search_experiments()]))

    page = tmp_path / "docs" / "results.md"
    capsys.readouterr()
    assert main(["report", "--results", str(page), "--store", str(home)]) == 0
    assert str(page) in capsys.readouterr().out
    text = page.read_text()
    for heading in ("## The identity", "## The quick matrix"):
        assert heading in text
    assert "| n | estimator | seed | status | steps to exact I |" in text
    for n, step in targets.items():
        assert re.search(rf"\| {n} \| sparse \| 0 \| finished \| {int(step):,} \|", text), n
    assert "stopped at step" in text and "solved for 2 evaluations" in text
    fit = fit_power_law(list(targets), list(targets.values()))
    assert f"b = {fit.b:.2f}, 2 cells" in text
    assert "Not in the stores yet (empty below): n = 16, 32, 64, 128, 256, 512, 1024" in text
    assert "sparsebench run --preset identity-large" in text
    assert "| identity n=4 (test/mse) |" in text and "| identity n=8 (test/mse) |" in text
    header = "| task / variant | estimator | chosen on validation | test | target | met | steps to target |"
    assert header in text
    for n, step in targets.items():  # one seed: no interval
        assert re.search(rf"\| identity n={n} \| sparse \|  \| test/mse \S+ \(1 seed\) \| val/mse <= 0 "
                         rf"\| 1/1 \| {int(step):,} \|", text), n
    assert re.search(r"- machine: CPU .+ \(\d+ cores\)", text)
    assert re.search(r"- sparsebench commit: ([0-9a-f]{40}|not recorded)", text)
    assert "- command: `sparsebench run --preset quick`" in text
    for name in ("identity_mse.png", "identity_mse.svg", "identity_steps.png", "identity_steps.svg"):
        assert (page.parent / "results" / name).stat().st_size > 1000, name
        assert f"results/{name}" in text or name.endswith(".svg")
    # read only: no report run, no reconciled run
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == runs_before


def test_a_missing_store_is_one_line_and_exit_2(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main(["report", "--results", str(tmp_path / "r.md"), "--store", str(missing)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(missing) in err[0]
    assert not (tmp_path / "r.md").exists()


def test_store_without_results_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["report", "--store", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--store goes with --results" in err[0]
