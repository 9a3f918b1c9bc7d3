"""Scores across the store: per estimator and task variant, the configuration chosen on validation,
its test metric with a 95% confidence interval over seeds and its steps and time to target; and a
performance profile (Dolan and Moré 2002) across all task variants.

Confidence interval: Student's t, ``mean ± t(0.975, n - 1) s / sqrt(n)`` over the seeds of the
selected configuration. A benchmark runs a handful of seeds (1 to 5); a percentile bootstrap on so
few values cannot be wider than their range (at n = 3 it has 10 distinct resamples) and covers
far below 95%, while the t interval is exact for normal errors and widens as seeds get few. One
seed has no interval ("1 seed").

Steps and time to target: a cell's ``summary/target_step`` and ``summary/target_wall_s`` (the first
evaluation whose validation metric met the task's ``Target``; the wall time counts training and
evaluations since the cell started). A cell with a target that finished or diverged without
meeting it counts as infinite; an entry's value is the median over its seeds (infinite when half
or more never met it), as AlgoPerf takes the median over studies.

Performance profile: for a measure ``t[p, s]`` (lower is better) on variant ``p`` for estimator
``s``, the ratio ``r = max(t, floor) / max(min_s t, floor)``, and ``rho_s(tau)`` the fraction of
variants with ``r <= tau``. The floor keeps zeros meaningful (an identity MSE of 0 and of 1e-13
both mean exact I, a ratio of 1, not 0/0 or infinity): ``METRIC_FLOOR`` for final metrics,
``STEP_FLOOR`` (one step) for steps. An estimator without a finite value on a variant (never met
the target, diverged, failed, n/a or not run there) has an infinite ratio: its curve never reaches
1 and it stays in the profile. Variants without a target are left out of the steps profile; a
variant no estimator solved counts against every estimator.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from reports.frame import ENTRY, natural_key
from reports.schema import DIVERGED, FINISHED
from reports.tables import GROUP, best_sweeps, final_value, select_value

__all__ = [
    "CI_LEVEL",
    "MEASURES",
    "METRIC_FLOOR",
    "STEP_FLOOR",
    "draw_profile",
    "performance_profile",
    "performance_ratios",
    "score_table",
    "t_interval",
]

CI_LEVEL = 0.95
METRIC_FLOOR = 1e-6  # final metrics at or below this count as equal (exact I's MSE 0 vs 1e-13)
STEP_FLOOR = 1.0  # a target met at step 0 counts as one step
#: The profile's measures: score table column -> (what it is, floor).
MEASURES: dict[str, tuple[str, float]] = {
    "steps_to_target": ("steps to target", STEP_FLOOR),
    "test_mean": ("final test metric", METRIC_FLOOR),
}
_TARGET_STEP, _TARGET_WALL = "metrics.summary/target_step", "metrics.summary/target_wall_s"
_JUDGED = (FINISHED, DIVERGED)  # cells whose target outcome is settled


def t_interval(values: pd.Series | np.ndarray, level: float = CI_LEVEL) -> tuple[float, float, float]:
    """``(mean, low, high)`` of the Student-t interval at ``level``; low and high NaN for one value."""
    x = np.asarray(pd.Series(values).dropna(), dtype=float)
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if len(x) == 1:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, len(x) - 1)) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return mean, mean - half, mean + half


def _to_target(cells: pd.DataFrame, column: str) -> pd.Series:
    """Per cell: the logged value, infinite where a settled cell with a target never met it, NaN
    where it has no target or is not settled."""
    logged = pd.to_numeric(cells[column], errors="coerce") if column in cells else pd.Series(
        np.nan, index=cells.index)
    has_target = cells["target"].ne("") if "target" in cells else pd.Series(False, index=cells.index)
    missed = has_target & logged.isna() & cells["status"].isin(_JUDGED)
    return logged.where(has_target).mask(missed, math.inf)


def _median(values: pd.Series) -> float:
    values = values.dropna()
    return float(np.median(values)) if len(values) else math.nan


def _text(mean: float, low: float, high: float, seeds: int) -> str:
    if math.isnan(mean):
        return ""
    if seeds == 1:
        return f"{mean:.4g} (1 seed)"
    return f"{mean:.4g} [{low:.4g}, {high:.4g}] ({seeds} seeds)"


def score_table(runs: pd.DataFrame) -> pd.DataFrame:
    """A row per experiment x task variant x estimator: the configuration with the best mean
    validation metric (``best_sweeps``), its test metric (mean and 95% t interval over finished
    seeds), its validation mean, and its steps and wall time to target (median over seeds)."""
    chosen = best_sweeps(runs)
    chosen = chosen.assign(
        _test=final_value(chosen).where(chosen["status"].eq(FINISHED)),
        _val=select_value(chosen).where(chosen["status"].eq(FINISHED)),
        _steps=_to_target(chosen, _TARGET_STEP),
        _wall=_to_target(chosen, _TARGET_WALL),
    )
    rows = []
    for key, group in chosen.groupby(GROUP, dropna=False, sort=False):
        entry = dict(zip(GROUP, key, strict=True))
        finished = group["_test"].dropna()
        mean, low, high = t_interval(finished)
        targets = sorted(set(group["target"]) - {""}) if "target" in group else []
        settled = group["_steps"].dropna()
        rows.append({
            **entry,
            "configuration": ", ".join(c for c in (entry["sweep"], entry["settings"]) if c),
            "seeds": len(group),
            "finished": int(group["status"].eq(FINISHED).sum()),
            "select_metric": "/".join(sorted(set(group["select_metric"]) - {""})),
            "val_mean": group["_val"].mean(),
            "primary_metric": "/".join(sorted(set(group["primary_metric"]) - {""})),
            "test_mean": mean,
            "test_ci_low": low,
            "test_ci_high": high,
            "test": _text(mean, low, high, len(finished)) or _status(group),
            "target": "; ".join(targets),
            "target_met": f"{int(np.isfinite(settled).sum())}/{len(settled)}" if targets else "",
            "steps_to_target": _median(group["_steps"]),
            "wall_s_to_target": _median(group["_wall"]),
        })
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    return table.sort_values(ENTRY, key=lambda col: col.map(natural_key), ignore_index=True)


def _status(group: pd.DataFrame) -> str:
    counts = group["status"].replace("", "unknown").value_counts()
    return ", ".join(f"{n} {s}" for s, n in counts.items())


def performance_ratios(scores: pd.DataFrame, measure: str) -> pd.DataFrame:
    """Variant (rows: "experiment: task variant") x estimator: each estimator's ratio to the best
    on ``measure`` (a ``MEASURES`` column of ``score_table``), floored; infinite where it has no
    finite value. For the steps measure only variants where some estimator has a target are rows."""
    floor = MEASURES[measure][1]
    scores = scores.assign(row=scores["experiment"] + ": " + scores["task"] + " " + scores["variant"])
    if measure == "steps_to_target":  # variants with a target; their n/a entries stay, as inf
        scores = scores[scores.groupby("row")["target"].transform(lambda t: t.ne("").any())]
    values = scores.pivot_table(index="row", columns="estimator", values=measure, aggfunc="min",
                                dropna=False)
    estimators = sorted(set(scores["estimator"]) | set(values.columns), key=natural_key)
    values = values.reindex(columns=estimators)
    values = values.where(np.isfinite(values), math.inf).fillna(math.inf)  # failed or not run
    best = values.min(axis=1)
    ratios = values.clip(lower=floor).div(best.clip(lower=floor), axis=0)
    ratios.loc[~np.isfinite(best)] = math.inf  # nobody solved it: counts against everyone
    return ratios.reindex(sorted(ratios.index, key=natural_key))


def performance_profile(ratios: pd.DataFrame, taus: np.ndarray) -> pd.DataFrame:
    """``rho_s(tau)``: the fraction of variants (rows of ``ratios``) on which each estimator is
    within a factor ``tau`` of the best. Columns: tau, then one per estimator."""
    rows = len(ratios)
    profile = {"tau": np.asarray(taus, dtype=float)}
    for estimator in ratios.columns:
        r = ratios[estimator].to_numpy(dtype=float)
        profile[estimator] = [float((r <= tau).sum()) / rows if rows else math.nan for tau in taus]
    return pd.DataFrame(profile)


def profile_taus(ratios: pd.DataFrame, points: int = 200) -> np.ndarray:
    """A log grid from 1 past the largest finite ratio (at least to 10), with 1, 2, 4, 10 on it."""
    finite = ratios.to_numpy(dtype=float)
    finite = finite[np.isfinite(finite)]
    top = max(10.0, float(finite.max()) * 1.5 if finite.size else 10.0)
    return np.unique(np.concatenate([np.geomspace(1.0, top, points), [1.0, 2.0, 4.0, 10.0]]))


def draw_profile(profiles: dict[str, pd.DataFrame], ratios: dict[str, pd.DataFrame],
                 out_dir: Path) -> list[Path]:
    """``performance_profile.png``/``.svg``: a panel per measure, rho against tau (log), a step
    line per estimator; an estimator that never reaches 1 says so in the legend."""
    from reports.plotting import dashes_for, markers_for, plt, save

    fig, axes = plt.subplots(1, len(profiles), figsize=(5.2 * len(profiles), 3.6), squeeze=False)
    for ax, (measure, profile) in zip(axes[0], profiles.items(), strict=True):
        estimators = [c for c in profile.columns if c != "tau"]
        dashes, markers = dashes_for(estimators), markers_for(estimators)
        variants = len(ratios[measure])
        for estimator in estimators:
            solved = int(np.isfinite(ratios[measure][estimator]).sum())
            label = f"{estimator} ({solved}/{variants} variants)"
            line, = ax.step(profile["tau"], profile[estimator], where="post", label=label,
                            marker=markers[estimator], markevery=[0], lw=1.2)
            if dashes[estimator]:
                line.set_dashes(dashes[estimator])
        ax.set_xscale("log")
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("tau (ratio to the best estimator on a variant)")
        ax.set_ylabel("fraction of variants within tau")
        ax.set_title(f"{MEASURES[measure][0]} ({variants} task variants)")
        ax.legend(fontsize=7, title="estimator (finite on)", title_fontsize=7)
    fig.suptitle("Performance profiles (Dolan and Moré 2002): higher and further left is better")
    fig.tight_layout()
    return save(fig, out_dir, "performance_profile")
