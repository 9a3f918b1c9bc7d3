"""``build_results``: the repository's results page (``docs/results.md``) from one or more stores.

Where ``build_report`` writes a browsable report of one store and logs it as a run, this writes a
markdown page meant to be committed: the identity task from n = 4 up to the largest size the
stores hold (test MSE against step, steps to exact I against n with a power-law fit, wall time per
cell and per step) and the quick matrix's table, each with the machine, the command, the
sparsebench commit and the dates of the runs behind it. It only reads the stores.

Imported only by the ``report`` command: it pulls in pandas, seaborn and MLflow.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from reports import schema
from reports.frame import StoreData, display_uri, natural_key, read_store
from reports.scores import score_table
from reports.tables import matrix_summary, stop_note

__all__ = [
    "IDENTITY_SIZES", "PowerLaw", "build_results", "fit_power_law", "steps_to_target", "with_legacy_eval",
]

#: The identity sizes the page reports on: the paper's 4 .. 64 and issue 23's 128 .. 1024.
IDENTITY_SIZES = (4, 8, 16, 32, 64, 128, 256, 512, 1024)
#: The runs that fill sizes no store holds yet: the paper's sizes at the paper's budgets, the
#: identity-large preset (two seeds, n = 64 .. 512, stopped once solved) and n = 1024 on one seed with
#: the sample counts the preset's rule gives (a_g = 2 log2 n - 2, region log2 n).
FILL_COMMANDS = (
    "sparsebench run --preset paper --task identity --estimator sparse --size 4,8,16,32 --threads 1",
    "sparsebench run --preset identity-large --threads 1 --checkpoint-minutes 10",
    "sparsebench run --preset identity-large --threads 1 --checkpoint-minutes 10 --seeds 0 "
    "--set 'tasks.identity.variants=[{n = 1024, steps = 200000}]' "
    "--set 'overrides=[{match = {task = \"identity\", n = 1024}, "
    "estimator = {a_l = 2, a_g = 18, region = [10, 10]}}]'",
)


@dataclass(frozen=True)
class PowerLaw:
    """``steps ~ a n^b``, fitted by least squares on log steps against log n."""

    a: float
    b: float
    points: int

    def __call__(self, n: np.ndarray) -> np.ndarray:
        return self.a * np.asarray(n, dtype=float) ** self.b


def fit_power_law(n: Sequence[float], steps: Sequence[float]) -> PowerLaw | None:
    """The power law through (n, steps) points, or None with fewer than two distinct sizes."""
    x, y = np.log(np.asarray(n, dtype=float)), np.log(np.asarray(steps, dtype=float))
    if len(set(x.tolist())) < 2:
        return None
    b, log_a = np.polyfit(x, y, 1)
    return PowerLaw(float(math.exp(log_a)), float(b), len(x))


#: Stores written before issue 19 logged one evaluation set, ``eval/``: it stands for both splits.
LEGACY_KEYS = ("mse", "rows_correct")


def with_legacy_eval(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with ``val/<m>`` and ``test/<m>`` filled from ``eval/<m>`` where a cell logged
    only the latter (a store written before validation splits), so old stores still make the page."""
    frame = frame.copy()
    for key in LEGACY_KEYS:
        legacy = frame.get(f"eval/{key}")
        if legacy is None:
            continue
        for split in ("val", "test"):
            column = f"{split}/{key}"
            frame[column] = frame[column].fillna(legacy) if column in frame else legacy
    return frame


def steps_to_target(frame: pd.DataFrame) -> pd.DataFrame:
    """Per identity cell: the first evaluated step with validation MSE 0 (exact I) and the
    training wall time then, read from the evaluation history, so stores written before the runner
    logged ``summary/target_step`` count too. NaN where the cell never got there."""
    rows = []
    for run_id, cell in frame.groupby("run_id", sort=False):
        cell = cell.sort_values("step")
        exact = cell[cell.get("val/mse", pd.Series(dtype=float)).eq(0.0)]
        first = exact.iloc[0] if len(exact) else None
        rows.append({
            "run_id": run_id,
            "target_step": float(first["step"]) if first is not None else np.nan,
            "target_wall_s": float(first.get("time/elapsed_s", np.nan)) if first is not None else np.nan,
            "last_step": float(cell["step"].max()) if cell["step"].notna().any() else np.nan,
            "last_mse": float(cell["test/mse"].dropna().iloc[-1]) if cell.get("test/mse") is not None
            and cell["test/mse"].notna().any() else np.nan,
            "last_rows": float(cell["test/rows_correct"].dropna().iloc[-1])
            if "test/rows_correct" in cell and cell["test/rows_correct"].notna().any() else np.nan,
        })
    return pd.DataFrame(rows)


def build_results(uris: Sequence[str], page: Path, command: str) -> list[Path]:
    """Write ``page`` and its figures (``<page's folder>/<page's stem>/``) from the cell runs of
    every store in ``uris``; returns the files written. ``command`` is how the page was made.

    Raises ``reports.errors.ReportError`` naming a store that is absent or holds no cells.
    """
    stores = [read_store(uri) for uri in uris]
    labels = [_short_uri(s.uri) for s in stores]  # the same cell may be in two stores: keep them apart
    runs = pd.concat([s.runs.assign(store=label) for s, label in zip(stores, labels, strict=True)],
                     ignore_index=True)
    frame = with_legacy_eval(pd.concat([s.frame for s in stores], ignore_index=True))
    figures = page.parent / page.stem
    figures.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    lines = [
        "# Results",
        "",
        f"Generated on {today} by `{command}` from {_store_list(stores)}. "
        "Every table below names the machine, the command, the sparsebench commit and the dates of "
        "the runs behind it; regenerate the page with the same command once more runs are in. "
        "Settings and their sources: [protocols.md](protocols.md).",
        "",
    ]
    identity = runs[runs["task"].eq("identity")]
    lines += _identity_section(identity, frame[frame["task"].eq("identity")], page, figures, written)
    for label in labels:  # a table per store: two quick matrices are two measurements, not seeds
        quick = runs[runs["experiment"].eq("sparsebench-quick") & runs["store"].eq(label)]
        lines += _quick_section(quick, label if len(labels) > 1 else "")
    page.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return [page, *written]


def _store_list(stores: Sequence[StoreData]) -> str:
    return ", ".join(f"`{_short_uri(s.uri)}`" for s in stores)


def _short_uri(uri: str) -> str:
    shown = display_uri(uri)
    return shown.replace(os.path.expanduser("~"), "~")


def _provenance(runs: pd.DataFrame, command: str) -> list[str]:
    """The machine, the command, the commit and the dates of ``runs``, as a list under a table."""

    def distinct(column: str) -> str:
        values = sorted(set(runs[column].dropna().astype(str)) - {""}) if column in runs else []
        return ", ".join(values) if values else "not recorded"

    cpu = distinct(f"tags.{schema.CPU_TAG}")
    if cpu == "not recorded":  # stores written before the runner logged the CPU: the host at least
        workers = runs.get(f"tags.{schema.WORKER_TAG}", pd.Series(dtype=object)).dropna()
        hosts = sorted({str(w).partition(":")[0] for w in workers if w})
        cpu = f"not recorded (host {', '.join(hosts) or 'unknown'})"
    start = runs["start_time"].min().strftime("%Y-%m-%d %H:%M")
    end = runs["start_time"].max().strftime("%Y-%m-%d %H:%M UTC")
    return [
        f"- machine: CPU {cpu}; GPU {distinct(f'tags.{schema.GPU_TAG}')}; "
        f"device {distinct(f'tags.{schema.DEVICE_TAG}')}; "
        f"torch threads per cell {distinct(f'tags.{schema.THREADS_TAG}')}",
        f"- command: `{command}` (the experiments' presets; the store does not keep the command line)",
        f"- sparsebench commit: {distinct(f'tags.{schema.GIT_SHA_TAG}')}",
        f"- runs started: {start} to {end}",
        "",
    ]


def _identity_section(
    runs: pd.DataFrame, frame: pd.DataFrame, page: Path, figures: Path, written: list[Path]
) -> list[str]:
    lines = ["## The identity (paper §3.1, Fig. 2), n = 4 and up", ""]
    sizes = sorted({int(n) for n in pd.to_numeric(runs.get("params.task.n", pd.Series(dtype=str)))})
    missing = [n for n in IDENTITY_SIZES if n not in sizes]
    if missing:
        lines += [
            f"Not in the stores yet (empty below): n = {', '.join(map(str, missing))}. "
            "These commands fill them (CPU-days at n >= 256; each cell checkpoints and resumes), "
            "then rerun the command at the top with their stores:",
            "",
            *[f"    {c}" for c in FILL_COMMANDS],
            "",
        ]
    runs = runs[runs["status"].ne(schema.NA)]  # an estimator that cannot serve the task has no curve
    if runs.empty:
        return [*lines, "No identity cells in the stores.", ""]
    runs = runs.assign(n=pd.to_numeric(runs["params.task.n"]).astype(int))
    reached = runs.merge(steps_to_target(frame), on="run_id", how="left")
    rel = figures.name
    written += _draw_curves(runs, frame, figures)
    lines += [f"![test MSE against step, per n and estimator]({rel}/identity_mse.png)", ""]
    lines += [
        "Steps to exact I (the first evaluation with validation MSE 0, rounded structure exactly I), "
        "wall time per cell and per step:",
        "",
        *_markdown(_cell_table(reached)),
        "",
    ]
    fits = {e: fit_power_law(g["n"], g["target_step"]) for e, g in reached.dropna(subset=["target_step"])
            .groupby("estimator")}
    fits = {e: f for e, f in fits.items() if f is not None}
    if fits:
        written += _draw_growth(reached, fits, figures)
        lines += [f"![steps to exact I against n, with the fitted power law]({rel}/identity_steps.png)", ""]
        lines += [
            "Fitted growth (least squares of log steps on log n over every seed that reached exact I): "
            + "; ".join(f"{e}: steps ~ {f.a:.3g} n^{f.b:.2f} (b = {f.b:.2f}, {f.points} cells)"
                        for e, f in sorted(fits.items())),
            "",
        ]
    else:
        lines += ["No estimator reached exact I at two sizes yet: no growth law to fit.", ""]
    return [*lines, *_provenance(runs, _run_command(runs))]


def _cell_table(reached: pd.DataFrame) -> pd.DataFrame:
    rows = []
    several = reached["store"].nunique() > 1
    for _, r in reached.sort_values(["n", "estimator", "seed", "store"]).iterrows():
        if pd.notna(r["target_step"]):
            exact = f"{int(r['target_step']):,}"
        elif pd.notna(r["last_rows"]):
            rows_right = round(r["last_rows"] * r["n"])
            exact = f"not met by step {int(r['last_step']):,} ({rows_right} of {r['n']} rows right)"
        else:
            exact = "not met"
        rate = r.get("metrics.summary/steps_per_s", np.nan)
        rows.append({
            "n": r["n"],
            "estimator": r["estimator"],
            "seed": r["seed"],
            **({"store": r["store"]} if several else {}),
            "status": r["status"],
            "steps to exact I": exact,
            "wall s to exact I": _num(r["target_wall_s"]),
            "steps run": _num(r["last_step"], "{:,.0f}"),
            "wall s per cell": _num(r.get("metrics.summary/wall_s", np.nan)),
            "ms per step (wall / steps)": _num(1000 / rate if rate and pd.notna(rate) else np.nan),
            "final test MSE": _num(r["last_mse"], "{:.3g}"),
            "note": stop_note(r),
        })
    return pd.DataFrame(rows)


def _num(value: float, fmt: str = "{:,.1f}") -> str:
    return "" if value is None or pd.isna(value) else fmt.format(value)


def _draw_curves(runs: pd.DataFrame, frame: pd.DataFrame, figures: Path) -> list[Path]:
    from reports.plotting import dashes_for, plt, save, sns

    frame = frame.merge(runs[["run_id", "n"]], on="run_id").dropna(subset=["test/mse"])
    sizes = sorted(frame["n"].unique())
    estimators = sorted(frame["estimator"].unique())
    dashes = dashes_for(estimators)
    colours = dict(zip(estimators, sns.color_palette(n_colors=len(estimators)), strict=True))
    fig, axes = plt.subplots(1, len(sizes), figsize=(3.2 * len(sizes), 2.8), squeeze=False)
    for ax, n in zip(axes[0], sizes, strict=True):
        labelled: set[str] = set()
        for _, cell in frame[frame["n"].eq(n)].groupby("run_id", sort=False):  # a line per cell (seed)
            estimator = cell["estimator"].iloc[0]
            label = estimator if estimator not in labelled else None
            labelled.add(estimator)
            cell = cell.sort_values("step")
            line, = ax.plot(cell["step"], cell["test/mse"], label=label, lw=1, color=colours[estimator])
            if dashes[estimator]:
                line.set_dashes(dashes[estimator])
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_title(f"n = {n}")
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("test MSE (0: exactly I)")
    axes[0][-1].legend(fontsize=6)
    return save(fig, figures, "identity_mse")


def _draw_growth(reached: pd.DataFrame, fits: dict[str, PowerLaw], figures: Path) -> list[Path]:
    from reports.plotting import markers_for, plt, save

    markers = markers_for(sorted(fits))
    fig, ax = plt.subplots(figsize=(4, 3))
    for estimator, fit in sorted(fits.items()):
        points = reached[reached["estimator"].eq(estimator)].dropna(subset=["target_step"])
        dots = ax.scatter(points["n"], points["target_step"], marker=markers[estimator], label=estimator)
        grid = np.geomspace(points["n"].min(), points["n"].max(), 50)
        ax.plot(grid, fit(grid), lw=1, color=dots.get_facecolor()[0], label=f"fit: {fit.a:.3g} n^{fit.b:.2f}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("n")
    ax.set_ylabel("steps to exact I")
    ax.legend(fontsize=7)
    return save(fig, figures, "identity_steps")


def _quick_section(runs: pd.DataFrame, store: str) -> list[str]:
    where = f" from `{store}`" if store else ""
    lines = [f"## The quick matrix{where} (embedded digits, a smoke run, not a reproduction)", ""]
    if runs.empty:
        return [*lines, "No quick-matrix cells in the stores: `sparsebench run --preset quick`.", ""]
    summary = matrix_summary(runs)
    metric = summary.groupby(["task", "variant"])["primary_metric"].agg(lambda m: "/".join(set(m) - {""}))
    keys = zip(summary["task"], summary["variant"], strict=True)
    summary["entry"] = [f"{t} {v} ({metric[(t, v)]})" for t, v in keys]
    stopped = summary["stopped"].ne("")
    result = summary["result"].mask(summary["result"].str.startswith("n/a"), "n/a")  # reasons: the report
    summary["cell"] = result.where(~stopped, result + " (" + summary["stopped"] + ")")
    table = summary.pivot_table(index="entry", columns="estimator", values="cell", aggfunc=" / ".join)
    table = table.reindex(sorted(table.index, key=natural_key)).fillna("").reset_index()
    table = table.rename(columns={"entry": "task / variant (metric)"})
    return [
        *lines,
        "Final primary metric per cell (lower is better; mean ± std over seeds where there are several):",
        "",
        *_markdown(table),
        "",
        "Scores: per estimator and task variant, the configuration chosen on the validation metric, "
        "its test metric (mean [95% t interval] over seeds) and its steps to target (median over "
        "seeds; inf: never met); the report adds the performance profiles:",
        "",
        *_markdown(_scores(runs)),
        "",
        *_provenance(runs, _run_command(runs)),
    ]


def _scores(runs: pd.DataFrame) -> pd.DataFrame:
    scores = score_table(runs)
    steps = scores["steps_to_target"].map(lambda v: "" if pd.isna(v) else "inf" if np.isinf(v)
                                          else f"{v:,.0f}")
    return pd.DataFrame({
        "task / variant": scores["task"] + " " + scores["variant"],
        "estimator": scores["estimator"],
        "chosen on validation": scores["configuration"],
        "test": scores["primary_metric"] + " " + scores["test"],
        "target": scores["target"],
        "met": scores["target_met"],
        "steps to target": steps,
    })


def _run_command(runs: pd.DataFrame) -> str:
    presets = sorted({str(e).removeprefix("sparsebench-") for e in runs["experiment"]})
    return "; ".join(f"sparsebench run --preset {p}" for p in presets)


def _markdown(table: pd.DataFrame) -> list[str]:
    """A pipe table; cells are plain text, so only pipes need escaping."""
    def cell(value: object) -> str:
        missing = value is None or (isinstance(value, float) and math.isnan(value))
        return "" if missing else str(value).replace("|", "\\|")

    header = [str(c) for c in table.columns]
    rows = [[cell(v) for v in row] for row in table.itertuples(index=False)]
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
    ]
