"""The gradient report items from a store that real runs wrote: the training diagnostics' figure and
table (one line per estimator, a deterministic layer shown as zero variance, not dropped) and the
gradient study's bias-variance figure and table (an estimator without a distribution marked)."""

from __future__ import annotations

import pandas as pd

from harness.cli import main

COMMON = ["--no-progress", "--threads", "1"]


def test_the_report_draws_the_gradient_figures_and_marks_what_has_no_distribution(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("SPARSEBENCH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main([
        "run", "--task", "identity", "--estimator", "reinforce", "--estimator", "dense", *COMMON,
        "--set", "tasks.identity.variants=[{n = 4}]", "--set", "tasks.identity.steps=20",
        "--set", "tasks.identity.eval_every=10", "--set", "tasks.identity.eval_samples=64",
        "--set", "tasks.identity.snapshots=[]",
        "--set", "diagnostics.every=10", "--set", "diagnostics.draws=3",
        "--set", "tuning.trials=0",  # one cell per estimator: the lines are the estimators, no trials
    ]) == 0  # fmt: skip
    assert main([
        "run", "--preset", "gradient-study", "--task", "study_permutation", "--size", "3",
        "--estimator", "reinforce", "--estimator", "dense", *COMMON,
        "--set", "tasks.study_permutation.draws=20", "--set", "tasks.study_permutation.samples=[1, 4]",
        "--set", "estimators.dense.tau=1.0",
    ]) == 0  # fmt: skip
    out = tmp_path / "report"
    assert main(["report", "--out", str(out)]) == 0
    for stem in ("grad_identity", "gradient_study_permutation"):
        assert (out / f"{stem}.png").stat().st_size > 0 and (out / f"{stem}.svg").exists()
    training = pd.read_csv(out / "grad_identity_table.csv")
    assert set(training["estimator"]) == {"reinforce", "dense"}
    dense = training[training["estimator"].eq("dense")].iloc[0]
    assert dense["rel_var"] == 0.0 and dense["sampling_share"] == 0.0  # deterministic: no sampling noise
    reinforce = training[training["estimator"].eq("reinforce")].iloc[0]
    assert reinforce["rel_var"] > 0 and reinforce["seconds per measurement"] > 0
    study = pd.read_csv(out / "gradient_study_permutation_table.csv")
    # the preset sweeps dense's gumbel_samples: deterministic NeuralSort marked, stochastic declared
    assert set(study["estimator"]) == {
        "reinforce", "dense gumbel_samples=0 (no distribution)", "dense gumbel_samples=1"
    }
    assert sorted(study["samples"].unique()) == [1, 4]
    marked = study[study["estimator"].eq("dense gumbel_samples=0 (no distribution)")]
    assert marked["variance"].eq(0.0).all() and marked["bias2"].isna().all()
    declared = study[study["estimator"].eq("reinforce")]
    assert declared["mse"].notna().all() and (declared["variance"] > 0).all()
    page = (out / "index.html").read_text()
    assert "Gradient diagnostics: identity" in page and "Gradient study: study_permutation" in page


def test_the_glimpse_study_runs_from_the_preset_and_marks_the_glimpses_without_a_listed_law(
    tmp_path, monkeypatch
):
    """Real study_glimpse cells through ``run --preset gradient-study``: rloo's leave-one-out has no
    estimate from one sample (none reported, nothing made up), the sparse glimpse and the dense
    read-out are marked, and the report draws the glimpse study's figure and table."""
    monkeypatch.setenv("SPARSEBENCH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main([
        "run", "--preset", "gradient-study", "--task", "study_glimpse",
        "--estimator", "rloo", "--estimator", "sparse", "--estimator", "dense", *COMMON,
        "--set", "tasks.study_glimpse.draws=20", "--set", "tasks.study_glimpse.samples=[1, 4]",
    ]) == 0  # fmt: skip
    out = tmp_path / "report"
    assert main(["report", "--out", str(out)]) == 0
    assert (out / "gradient_study_glimpse.png").stat().st_size > 0
    study = pd.read_csv(out / "gradient_study_glimpse_table.csv")
    assert set(study["estimator"]) == {"rloo", "sparse (no distribution)", "dense (no distribution)"}
    rloo = study[study["estimator"].eq("rloo")]
    assert rloo["samples"].tolist() == [4] and rloo["mse"].notna().all() and (rloo["variance"] > 0).all()
    assert study[study["estimator"].str.endswith("(no distribution)")]["bias2"].isna().all()
    assert (study[study["estimator"].eq("sparse (no distribution)")]["variance"] > 0).all()
    assert "Gradient study: study_glimpse" in (out / "index.html").read_text()


def test_the_report_draws_bias_and_variance_against_the_temperature(tmp_path, monkeypatch):
    """Stochastic NeuralSort swept over tau from the preset: its bias against the Plackett-Luce
    gradient grows with tau while its variance falls; deterministic NeuralSort is marked."""
    monkeypatch.setenv("SPARSEBENCH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main([
        "run", "--preset", "gradient-study", "--task", "study_permutation", "--size", "4",
        "--estimator", "dense", *COMMON,
        "--set", "tasks.study_permutation.draws=100", "--set", "tasks.study_permutation.samples=[16]",
    ]) == 0  # fmt: skip
    out = tmp_path / "report"
    assert main(["report", "--out", str(out)]) == 0
    assert (out / "gradient_temperature_study_permutation.png").stat().st_size > 0
    table = pd.read_csv(out / "gradient_temperature_study_permutation_table.csv")
    stochastic = table[table["estimator"].eq("dense gumbel_samples=1")].set_index("temperature")
    assert sorted(stochastic.index) == [0.1, 0.3, 1.0, 3.0]
    assert stochastic.loc[3.0, "bias2"] > 10 * stochastic.loc[0.1, "bias2"]
    assert stochastic.loc[3.0, "variance"] < stochastic.loc[0.1, "variance"] / 10
    marked = table[table["estimator"].eq("dense gumbel_samples=0 (no distribution)")]
    assert len(marked) == 4 and marked["variance"].eq(0.0).all() and marked["bias2"].isna().all()
