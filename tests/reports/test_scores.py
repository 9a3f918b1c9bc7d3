"""Scores (issue 19): selection on validation only, the 95% t interval, steps to target and the
performance profile, on hand-made frames, on a real store whose test metrics are rewritten, and
on a real run's report."""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from scipy import stats

from harness.cli import main
from plugins.sorting_literature import selected_cells
from reports.frame import ENTRY, read_store
from reports.scores import (
    METRIC_FLOOR,
    performance_profile,
    performance_ratios,
    score_table,
    t_interval,
)
from reports.tables import GROUP, best_sweeps, final_value, matrix_summary

INF = math.inf


# ---- the confidence interval --------------------------------------------------------------------


@pytest.mark.parametrize("values", [[1.0, 2.0, 3.0], [0.755, 0.81, 0.7, 0.9, 0.66], [5.0, 5.0]])
def test_t_interval_is_scipys(values: list[float]) -> None:
    mean, low, high = t_interval(pd.Series(values))
    assert mean == pytest.approx(np.mean(values))
    if np.std(values) == 0:  # no spread: the interval is the point (scipy's scale must be > 0)
        assert (low, high) == (mean, mean)
        return
    want = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert (low, high) == pytest.approx(want)


def test_t_interval_by_hand_and_for_one_seed() -> None:
    # [1, 2, 3]: mean 2, s = 1, t(0.975, 2) = 4.302653 (tables), half-width 4.302653 / sqrt(3)
    mean, low, high = t_interval(pd.Series([1.0, 2.0, 3.0, np.nan]))
    assert (mean, high - mean) == pytest.approx((2.0, 4.302653 / math.sqrt(3)), rel=1e-6)
    assert mean - low == pytest.approx(high - mean)
    one = t_interval(pd.Series([0.7]))
    assert one[0] == 0.7 and math.isnan(one[1]) and math.isnan(one[2])


# ---- the performance profile --------------------------------------------------------------------


def _scores() -> pd.DataFrame:
    """Three estimators on three variants: A and B have targets, C none; z is n/a on B and
    never met A's target; y failed on C."""
    rows = [
        # variant, estimator, target, steps_to_target, test_mean
        ("A", "x", "val/mse <= 0", 100.0, 0.0),
        ("A", "y", "val/mse <= 0", 200.0, 1e-13),
        ("A", "z", "val/mse <= 0", INF, 0.5),
        ("B", "x", "val/error_pct <= 10", INF, 20.0),
        ("B", "y", "val/error_pct <= 10", 50.0, 10.0),
        ("B", "z", "", np.nan, np.nan),  # n/a: no finished seed, no target logged
        ("C", "x", "", np.nan, 3.0),
        ("C", "y", "", np.nan, np.nan),  # failed
        ("C", "z", "", np.nan, 6.0),
    ]
    frame = pd.DataFrame(rows, columns=["variant", "estimator", "target", "steps_to_target", "test_mean"])
    return frame.assign(experiment="e", task="t")


def test_ratios_by_hand() -> None:
    steps = performance_ratios(_scores(), "steps_to_target")
    assert list(steps.index) == ["e: t A", "e: t B"]  # C has no target
    assert steps.loc["e: t A"].tolist() == [1.0, 2.0, INF]
    assert steps.loc["e: t B"].tolist() == [INF, 1.0, INF]  # z: n/a there counts as never
    final = performance_ratios(_scores(), "test_mean")
    # A: 0 and 1e-13 are both below the floor (1e-6): a tie; z: 0.5 / 1e-6
    assert final.loc["e: t A"].tolist() == pytest.approx([1.0, 1.0, 0.5 / METRIC_FLOOR])
    assert final.loc["e: t B"].tolist() == [2.0, 1.0, INF]
    assert final.loc["e: t C"].tolist() == [1.0, INF, 2.0]


def test_profile_by_hand() -> None:
    taus = [1.0, 1.5, 2.0, 1e9]
    steps = performance_profile(performance_ratios(_scores(), "steps_to_target"), taus)
    assert steps["x"].tolist() == [0.5, 0.5, 0.5, 0.5]
    assert steps["y"].tolist() == [0.5, 0.5, 1.0, 1.0]
    assert steps["z"].tolist() == [0.0, 0.0, 0.0, 0.0]  # never met a target: never reaches 1
    final = performance_profile(performance_ratios(_scores(), "test_mean"), taus)
    assert final["x"].tolist() == pytest.approx([2 / 3, 2 / 3, 1.0, 1.0])
    assert final["y"].tolist() == pytest.approx([2 / 3, 2 / 3, 2 / 3, 2 / 3])
    assert final["z"].tolist() == pytest.approx([0.0, 0.0, 1 / 3, 2 / 3])


# ---- selection never reads the test metrics -----------------------------------------------------


def _rewrite_test_metrics(uri: str) -> int:
    """Log every test/ metric again at each of its steps with a later timestamp and the value
    turned upside down (1000 - v), so that the test ranking reverses; returns how many."""
    client = MlflowClient(tracking_uri=uri)
    later = int(time.time() * 1000) + 60_000
    written = 0
    experiments = [e.experiment_id for e in client.search_experiments()]
    for run in client.search_runs(experiments, "tags.`sparsebench.role` = 'cell'", max_results=1000):
        metrics = []
        for key in (k for k in run.data.metrics if k.startswith("test/")):
            for m in client.get_metric_history(run.info.run_id, key):
                metrics.append(Metric(key, 1000.0 - m.value, later, m.step))
        if metrics:
            client.log_batch(run.info.run_id, metrics=metrics)
            written += len(metrics)
    return written


def _choices(runs: pd.DataFrame, frame: pd.DataFrame) -> dict[str, object]:
    """Every place the report picks a configuration or an evaluation."""
    summary = matrix_summary(runs)
    heatmap = summary.sort_values("select_mean", na_position="last", kind="stable").drop_duplicates(ENTRY)
    scores = score_table(runs)
    neuralsort = selected_cells(runs, frame)
    return {
        "best_sweeps": sorted(map(tuple, best_sweeps(runs)[[*GROUP, "seed"]].astype(str).values)),
        "heatmap": sorted(map(tuple, heatmap[GROUP].astype(str).values)),
        "scores": sorted(map(tuple, scores[[*ENTRY, "configuration"]].astype(str).values)),
        "neuralsort_steps": neuralsort[[*GROUP, "seed", "step"]].astype(str).values.tolist(),
    }


def test_changing_the_test_metrics_of_a_store_changes_no_selection(layout_store, tmp_path: Path) -> None:
    copy = tmp_path / "store"
    shutil.copytree(layout_store.root, copy)
    uri = f"sqlite:///{copy / 'mlflow.db'}"
    before = read_store(uri)
    assert _rewrite_test_metrics(uri) > 100
    after = read_store(uri)
    # the test metrics did change, enough to reverse what a test-based choice would pick ...
    old, new = final_value(before.runs), final_value(after.runs)
    changed = old.notna() & new.notna()
    assert changed.sum() > 20 and np.allclose(new[changed], 1000.0 - old[changed])
    with pytest.raises(ValueError, match="validation metrics only"):
        best_sweeps(before.runs, "test/mse")
    reinforce = after.runs[after.runs["estimator"].eq("reinforce")]
    flipped = reinforce.assign(_t=final_value(reinforce)).groupby(GROUP)["_t"].mean().reset_index()
    flipped = flipped.sort_values("_t").drop_duplicates(ENTRY)
    chosen = best_sweeps(reinforce)
    assert set(flipped["sweep"]) != set(chosen["sweep"])  # the test set would now choose otherwise
    # ... and no selection moved
    assert _choices(before.runs, before.frame) == _choices(after.runs, after.frame)
    test_means = score_table(after.runs)["test_mean"].dropna()
    assert not np.allclose(test_means, score_table(before.runs)["test_mean"].dropna())


# ---- a real run, scored and profiled ------------------------------------------------------------


def test_a_real_run_is_scored_and_profiled(tmp_path: Path) -> None:
    """Two estimators on identity n = 4 (one solves it) with an lr sweep for one of them, through
    ``sparsebench run`` and ``sparsebench report``: the scores table, the profile figure and table."""
    home = tmp_path / "home"
    config = tmp_path / "sweep.toml"
    config.write_text(
        "[matrix]\ntasks = [\"identity\"]\nestimators = [\"dense\", \"reinforce\"]\nseeds = [0, 1]\n"
        "[tasks.identity]\nsteps = 60\neval_every = 20\neval_samples = 64\nsnapshots = []\n"
        "variants = [{ n = 4 }]\n"
        "[tuning]\ntrials = 0\n"  # the hand sweep below, not quick's ruleset
        "[[overrides]]\nmatch = { estimator = \"reinforce\" }\nsweep = { \"task.lr\" = [0.001, 0.05] }\n"
    )
    uri = f"sqlite:///{home / 'mlflow.db'}"
    common = ["--tracking-uri", uri, "--threads", "1", "--no-progress"]
    assert main(["run", "--config", str(config), *common]) == 0
    out = tmp_path / "report"
    assert main(["report", "--tracking-uri", uri, "--out", str(out)]) == 0
    scores = pd.read_csv(out / "scores.csv", keep_default_na=False)
    assert set(scores["estimator"]) == {"dense", "reinforce"} and len(scores) == 2
    reinforce = scores.set_index("estimator").loc["reinforce"]
    runs = read_store(uri).runs
    chosen = best_sweeps(runs[runs["estimator"].eq("reinforce")])
    assert reinforce["configuration"] == chosen["sweep"].iloc[0]
    assert reinforce["select_metric"] == "val/mse" and reinforce["primary_metric"] == "test/mse"
    finals = final_value(chosen)
    mean, low, high = t_interval(finals)
    assert float(reinforce["test_mean"]) == pytest.approx(mean)
    assert float(reinforce["test_ci_low"]) == pytest.approx(low)
    assert reinforce["target"] == "val/mse <= 0"
    profile = pd.read_csv(out / "performance_profile.csv")
    assert set(profile["measure"]) == {"steps to target", "final test metric"}
    assert ((profile[["dense", "reinforce"]] >= 0) & (profile[["dense", "reinforce"]] <= 1)).all().all()
    for suffix in (".png", ".svg"):
        assert (out / f"performance_profile{suffix}").stat().st_size > 5000
    page = (out / "index.html").read_text()
    assert "Performance profiles (Dolan and Moré 2002)" in page
    # this store, too, chooses the same after its test metrics are turned upside down
    before = read_store(uri)
    assert _rewrite_test_metrics(uri) > 0
    after = read_store(uri)
    assert not np.allclose(final_value(after.runs).dropna(), final_value(before.runs).dropna())
    assert _choices(before.runs, before.frame) == _choices(after.runs, after.frame)
