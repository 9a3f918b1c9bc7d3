"""Report figures of the sorting task: Fig. 6 (sorting error per n and estimator) and Fig. 7
(the intermediate steps of differentiable quicksort).

Fig. 7 reads ``snapshots/step=<n>/quicksort_steps.json`` in the schema ``plugins.sorting``
documents (``sparsebench.sorting.quicksort_steps/1``): ``x.values`` and ``t.values`` are the
numbers as the half-permutations mix them, ``x_0 .. x_L`` and ``t_0 .. t_L``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from harness.hookspecs import hookimpl
from reports.figure import Figure, NoFigureData, ReportContext

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["draw_fig6", "draw_fig7", "register_figures"]

METRIC = "eval/error_pct"
FIG7_N = 8  # the paper's Fig. 7 sorts 8 items
ANNOTATE_UP_TO = 16  # numbers written into the cells up to this many items


def _sorting_runs(ctx: ReportContext) -> pd.DataFrame:
    return ctx.runs[ctx.runs["task"].eq("sorting")]


def draw_fig6(ctx: ReportContext) -> list[Path]:
    """Left: test error against iterations (colour = n, line style = estimator, error bars = std
    over seeds). Right: final error per n and estimator, mean and std over finished seeds."""
    from reports.frame import natural_key
    from reports.plotting import dashes_for, plt, save, sns
    from reports.tables import FINISHED, best_sweeps, final_value

    runs = best_sweeps(_sorting_runs(ctx), METRIC)
    frame = ctx.frame
    curves = (frame[frame["run_id"].isin(runs["run_id"]) & frame[METRIC].notna()]
              if METRIC in frame else frame.iloc[:0])
    finals = runs.assign(final=final_value(runs, METRIC))
    finals = finals[finals["status"].eq(FINISHED) & finals["final"].notna()]
    if curves.empty:
        raise NoFigureData(f"no sorting cell has logged {METRIC} yet")
    experiments = sorted(curves["experiment"].unique())
    variants = sorted(curves["variant"].unique(), key=natural_key)
    estimators = sorted(curves["estimator"].unique(), key=lambda e: (e != "sparse", e))
    fig, axes = plt.subplots(len(experiments), 2, figsize=(12, 4.2 * len(experiments)),
                             squeeze=False)
    for (left, right), experiment in zip(axes, experiments, strict=True):
        sns.lineplot(
            data=curves[curves["experiment"].eq(experiment)], x="step", y=METRIC,
            hue="variant", hue_order=variants, style="estimator", style_order=estimators,
            dashes=dashes_for(estimators), errorbar="sd", err_style="bars", marker="o",
            markersize=3, palette="viridis", ax=left,
        )
        left.set(xlabel="iterations (training steps)", ylabel="test error (%)",
                 title=f"{experiment}: error during training")
        mine = finals[finals["experiment"].eq(experiment)]
        if mine.empty:
            right.text(0.5, 0.5, "no finished cells yet", ha="center", va="center")
            right.set_axis_off()
            continue
        sns.barplot(data=mine, x="variant", y="final", hue="estimator", order=[
            v for v in variants if v in set(mine["variant"])], hue_order=[
            e for e in estimators if e in set(mine["estimator"])], errorbar="sd", ax=right)
        right.set(xlabel="instance size", ylabel="final test error (%)",
                  title=f"{experiment}: final error (std over seeds)")
    fig.suptitle("Fig. 6: sorting, test error per n and estimator", y=1.01)
    fig.tight_layout()
    return save(fig, ctx.out_dir, "fig6_sorting")


def _fig7_run(ctx: ReportContext) -> tuple[pd.Series, int, dict]:
    """The first snapshot of a sorting cell, preferring the sparse quicksort at the paper's n."""
    from plugins.sorting import ARTIFACT, ARTIFACT_SCHEMA

    runs = _sorting_runs(ctx)
    runs = runs.assign(
        _not_sparse=runs["estimator"].ne("sparse"),
        _not_paper_n=runs["variant"].ne(f"n={FIG7_N}"),
    ).sort_values(["_not_sparse", "_not_paper_n", "seed"], kind="stable")
    for _, run in runs.iterrows():
        snaps = ctx.snapshots(run["run_id"], ARTIFACT)
        if snaps:
            step, path = next(iter(snaps.items()))
            data = json.loads(path.read_text())
            if data.get("schema") != ARTIFACT_SCHEMA:
                raise NoFigureData(
                    f"{ARTIFACT} of {run['run_name']} has schema {data.get('schema')!r}, "
                    f"this report reads {ARTIFACT_SCHEMA!r}"
                )
            return run, step, data
    raise NoFigureData(f"no sorting cell has logged snapshots/step=<n>/{ARTIFACT}")


def draw_fig7(ctx: ReportContext) -> list[Path]:
    """Rows d = 0 .. L: left the input as the half-permutations transform it (x_d), right the
    target fed back through their transposes (t_d); cells are the (mixed) numbers."""
    import numpy as np

    from reports.plotting import plt, save, sns

    run, step, data = _fig7_run(ctx)
    x, t = np.asarray(data["x"]["values"]), np.asarray(data["t"]["values"])  # (L+1, n) each
    n = x.shape[1]
    lo, hi = float(min(x.min(), t.min())), float(max(x.max(), t.max()))
    fig, axes = plt.subplots(1, 2, figsize=(2 * (0.55 * n + 1.5), 0.55 * len(x) + 1.6))
    for ax, rows, title in ((axes[0], x, "input, transformed (x_d)"),
                            (axes[1], t, "target, reverse-sorted (t_d)")):
        sns.heatmap(rows, ax=ax, vmin=lo, vmax=hi, cmap="viridis", cbar=False,
                    annot=n <= ANNOTATE_UP_TO, fmt=".0f", annot_kws={"fontsize": 6},
                    yticklabels=[f"d={d}" for d in range(len(rows))], xticklabels=False)
        ax.set(title=title, xlabel="position")
    fig.suptitle(f"Fig. 7: quicksort steps, {run['run_name']} at step {step} "
                 f"({data.get('layer', '')})", y=1.02)
    return save(fig, ctx.out_dir, "fig7_sorting_quicksort")


FIGURES = (
    Figure(
        name="fig6_sorting",
        task="sorting",
        title="Fig. 6: sorting, test error per n and estimator",
        paper_note=(
            "Error (share of 10,000 test instances not sorted exactly) for 3-digit MNIST numbers, "
            "n = 4, 8, 16, error bars = std over repeats: n = 4 reaches below 10 %, n = 8 "
            "converges to a similar value with more variance, n = 16 reaches about 40 % at best. "
            "One run took 1 h 40 m, 7 h 10 m and 32 h 14 m on average."
        ),
        draw=draw_fig6,
    ),
    Figure(
        name="fig7_sorting_quicksort",
        task="sorting",
        title="Fig. 7: sorting, intermediate steps of differentiable quicksort",
        paper_note=(
            "8 single-digit numbers in the first step of training: left the input as each "
            "half-permutation transforms it, right the target reverse-sorted through the "
            "transposed half-permutations; each intermediate target guides its step."
        ),
        draw=draw_fig7,
    ),
)


@hookimpl
def register_figures(register: Callable[[Figure], None]) -> None:
    for figure in FIGURES:
        register(figure)
