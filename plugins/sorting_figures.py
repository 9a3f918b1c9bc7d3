"""Report items of the sorting task: Fig. 6 (sorting error per n and estimator), Fig. 7 (the
intermediate steps of differentiable quicksort) and the NeuralSort-protocol table (Grover et al.
2019, Table 1, beside ours).

Fig. 6 shows the paper's experiment: cells of the ``bloem`` protocol with 3-digit numbers, every
evaluation the cells logged (the ``paper`` preset evaluates every 500/500/1000 steps at n = 4/8/16,
the resolution of the authors' Fig. 6 script, sparse-hyper ``plot.sort.py`` at the preprint).
Its error is the one the cells' ``ties`` param names: ``test/error_strict_pct`` (the authors'
index comparison, tied numbers in input order) when every cell asks for ``"strict"``, else
``test/error_pct`` (tied numbers in any order); the title says which. A sweep's best configuration
is chosen on the same error on the validation instances (``val/...``).

Fig. 7 reads ``snapshots/step=<n>/quicksort_steps.json`` and its ``quicksort_steps.npz`` in the
schema ``plugins.sorting`` documents (``sparsebench.sorting.quicksort_steps/2``): the images as
every half-permutation mixes them, ``x_0 .. x_L`` and ``t_0 .. t_L``. It prefers what the paper
drew: the sparse quicksort on 8 single-digit numbers (the ``paper`` preset's ``n=8,digits=1``
variant), in the first step of training.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from harness.hookspecs import hookimpl
from reports.figure import Figure, NoFigureData, ReportContext

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

__all__ = ["draw_fig6", "draw_fig7", "draw_neuralsort_table", "fig6_metric", "register_figures"]

METRIC = "test/error_pct"
STRICT_METRIC = "test/error_strict_pct"
FIG6_DIGITS = 3  # the paper's Fig. 6 sorts 3-digit numbers
FIG7_N, FIG7_DIGITS = 8, 1  # the paper's Fig. 7 sorts 8 single-digit numbers
_GAP = 4  # pixels between the images of Fig. 7


def _sorting_runs(ctx: ReportContext) -> pd.DataFrame:
    return ctx.runs[ctx.runs["task"].eq("sorting")]


def _param(runs: pd.DataFrame, name: str, default: str) -> pd.Series:
    """A task param per run as logged (text), ``default`` where a run predates it."""
    import pandas as pd

    column = f"params.task.{name}"
    values = runs[column] if column in runs else pd.Series(default, index=runs.index)
    return values.fillna(default).astype(str)


def _fig6_runs(ctx: ReportContext) -> pd.DataFrame:
    runs = _sorting_runs(ctx)
    protocol, digits = _param(runs, "protocol", "bloem"), _param(runs, "digits", str(FIG6_DIGITS))
    return runs[protocol.eq("bloem") & digits.eq(str(FIG6_DIGITS))]


def fig6_metric(runs: pd.DataFrame) -> tuple[str, str]:
    """The error Fig. 6 shows, and how it treats ties: strict only if every cell asks for it."""
    ties = set(_param(runs, "ties", "any_order"))
    if ties == {"strict"}:
        return STRICT_METRIC, "tied numbers in input order (the authors' index comparison)"
    mixed = " (cells differ in ties)" if len(ties) > 1 else ""
    return METRIC, f"tied numbers in any order{mixed}"


def draw_fig6(ctx: ReportContext) -> list[Path]:
    """Left: test error against iterations, every logged evaluation (colour = n, line style =
    estimator, error bars = std over seeds). Right: final error per n and estimator."""
    from reports.frame import natural_key
    from reports.plotting import dashes_for, plt, save, sns
    from reports.schema import FINISHED
    from reports.tables import best_sweeps, final_value

    metric, ties = fig6_metric(_fig6_runs(ctx))
    runs = best_sweeps(_fig6_runs(ctx), metric.replace("test/", "val/", 1))  # chosen on validation
    frame = ctx.frame
    curves = (frame[frame["run_id"].isin(runs["run_id"]) & frame[metric].notna()]
              if metric in frame else frame.iloc[:0])
    finals = runs.assign(final=final_value(runs, metric))
    finals = finals[finals["status"].eq(FINISHED) & finals["final"].notna()]
    if curves.empty:
        raise NoFigureData(
            f"no sorting cell of the paper's protocol ({FIG6_DIGITS}-digit numbers) has logged "
            f"{metric} yet"
        )
    experiments = sorted(curves["experiment"].unique())
    variants = sorted(curves["variant"].unique(), key=natural_key)
    estimators = sorted(curves["estimator"].unique(), key=lambda e: (e != "sparse", e))
    fig, axes = plt.subplots(len(experiments), 2, figsize=(12, 4.2 * len(experiments)),
                             squeeze=False)
    for (left, right), experiment in zip(axes, experiments, strict=True):
        sns.lineplot(
            data=curves[curves["experiment"].eq(experiment)], x="step", y=metric,
            hue="variant", hue_order=variants, style="estimator", style_order=estimators,
            dashes=dashes_for(estimators), errorbar="sd", err_style="bars", palette="viridis",
            linewidth=1.0, err_kws={"elinewidth": 0.5}, ax=left,
        )
        left.set(xlabel="iterations (training steps)", ylabel="test error (%)", ylim=(0, 100),
                 title=f"{experiment}: error during training")
        mine = finals[finals["experiment"].eq(experiment)]
        if mine.empty:
            right.text(0.5, 0.5, "no finished cells yet", ha="center", va="center")
            right.set_axis_off()
            continue
        sns.barplot(data=mine, x="variant", y="final", hue="estimator", order=[
            v for v in variants if v in set(mine["variant"])], hue_order=[
            e for e in estimators if e in set(mine["estimator"])], errorbar="sd", ax=right)
        right.set(xlabel="instance size", ylabel="final test error (%)", ylim=(0, 100),
                  title=f"{experiment}: final error (std over seeds)")
    fig.suptitle(f"Fig. 6: sorting, test error per n and estimator ({metric}: {ties})", y=1.01)
    fig.tight_layout()
    return save(fig, ctx.out_dir, "fig6_sorting")


def _fig7_run(ctx: ReportContext) -> tuple[pd.Series, int, dict, Path]:
    """The first snapshot of a sorting cell, preferring the sparse quicksort on the paper's
    8 single-digit numbers; returns the run, the step, the JSON document and its npz."""
    from plugins.sorting import ARTIFACT, ARTIFACT_SCHEMA

    runs = _sorting_runs(ctx)
    runs = runs.assign(
        _not_sparse=runs["estimator"].ne("sparse"),
        _not_paper_n=_param(runs, "n", "").ne(str(FIG7_N)),
        _not_paper_digits=_param(runs, "digits", "").ne(str(FIG7_DIGITS)),
    ).sort_values(["_not_sparse", "_not_paper_digits", "_not_paper_n", "seed"], kind="stable")
    for _, run in runs.iterrows():
        snaps = ctx.snapshots(run["run_id"], ARTIFACT)
        if not snaps:
            continue
        step, path = next(iter(snaps.items()))
        data = json.loads(path.read_text())
        if data.get("schema") != ARTIFACT_SCHEMA:
            raise NoFigureData(
                f"{ARTIFACT} of {run['run_name']} has schema {data.get('schema')!r}, "
                f"this report reads {ARTIFACT_SCHEMA!r}"
            )
        images = ctx.snapshots(run["run_id"], data["images"]).get(step)
        if images is None:
            raise NoFigureData(f"{run['run_name']} logged {ARTIFACT} but not {data['images']}")
        return run, step, data, images
    raise NoFigureData(f"no sorting cell has logged snapshots/step=<n>/{ARTIFACT}")


def _mosaic(states: np.ndarray) -> np.ndarray:
    """``(L+1, n, digits, 28, 28)`` -> one image: a row per step, the items side by side, each
    number's digits side by side, ``_GAP`` pixels of NaN (drawn blank) between items and rows."""
    import numpy as np

    rows, n, digits, side, _ = states.shape
    width = digits * side
    out = np.full((rows * (side + _GAP) - _GAP, n * (width + _GAP) - _GAP), np.nan)
    for r in range(rows):
        for i in range(n):
            number = np.concatenate(list(states[r, i]), axis=1)  # (28, 28 * digits)
            y, x = r * (side + _GAP), i * (width + _GAP)
            out[y:y + side, x:x + width] = number
    return out


def draw_fig7(ctx: ReportContext) -> list[Path]:
    """Rows d = 0 .. L: left the input images as the half-permutations transform them (x_d),
    right the sorted target fed back through their transposes (t_d), as the paper draws it."""
    import numpy as np

    from reports.plotting import plt, save

    run, step, data, images = _fig7_run(ctx)
    with np.load(images) as arrays:
        x, t = arrays["x"], arrays["t"]  # (L+1, n, digits, 28, 28) each
    rows, n = x.shape[:2]
    left, right = _mosaic(x), _mosaic(t)
    side = 0.35 * n * data["digits"] + 0.8  # inches per panel
    height = side * left.shape[0] / left.shape[1] + 0.9
    fig, axes = plt.subplots(1, 2, figsize=(2 * side, height))
    cmap = plt.get_cmap("gray_r").with_extremes(bad="white")
    centres = [r * (28 + _GAP) + 14 for r in range(rows)]
    for ax, mosaic, title, name in ((axes[0], left, "input, transformed", "x"),
                                    (axes[1], right, "target, reverse-sorted", "t")):
        ax.imshow(mosaic, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_yticks(centres, [f"${name}_{d}$" for d in range(rows)])
        ax.set_xticks([])
        ax.grid(False)
        ax.set_title(title)
    fig.suptitle(
        f"Fig. 7: the steps of {data['layer']}, {run['run_name']} at step {step}; "
        f"numbers {data['values']}", fontsize=8,
    )
    fig.tight_layout()
    return save(fig, ctx.out_dir, "fig7_sorting_quicksort")


def draw_neuralsort_table(ctx: ReportContext) -> list[Path]:
    """Grover et al. 2019, Table 1, beside our NeuralSort-protocol cells (CSV and HTML)."""
    from plugins.sorting_literature import neuralsort_table
    from reports.tables import write_table

    table = neuralsort_table(ctx.runs, ctx.frame)
    if not table["source"].str.startswith("ours").any():
        raise NoFigureData("no sorting cell of the neuralsort protocol (preset neuralsort) yet")
    return write_table(table, ctx.out_dir, "table_neuralsort",
                       "Sorting, NeuralSort protocol: all-correct (per-element) beside "
                       "Grover et al. 2019, Table 1")


FIGURES = (
    Figure(
        name="fig6_sorting",
        task="sorting",
        title="Fig. 6: sorting, test error per n and estimator",
        paper_note=(
            "Error (share of 10,000 test instances not sorted exactly; the authors' code compares "
            "sort indices, so tied numbers count only in input order) for 3-digit MNIST numbers, "
            "n = 4, 8, 16, error bars = std over repeats: n = 4 reaches below 10 %, n = 8 "
            "converges to a similar value with more variance, n = 16 reaches about 40 % at best. "
            "The authors' plotting script shows 30k/60k/120k iterations evaluated every "
            "500/500/1000. One run took 1 h 40 m, 7 h 10 m and 32 h 14 m on average."
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
    Figure(
        name="table_neuralsort",
        task="sorting",
        title="Sorting, NeuralSort protocol: all-correct (per-element) beside Grover et al. 2019",
        paper_note=(
            "Grover et al. 2019, Table 1 (test set, 4-digit large-MNIST numbers): deterministic "
            "NeuralSort 0.930 / 0.837 / 0.738 / 0.649 / 0.386 of permutations exactly right at "
            "n = 3 / 5 / 7 / 9 / 15; Gumbel-Sinkhorn 0.484 / 0.033 / 0.001 / 0 / 0. Temperatures "
            "and checkpoints chosen on validation all-correct, ours the same way."
        ),
        draw=draw_neuralsort_table,
    ),
)


@hookimpl
def register_figures(register: Callable[[Figure], None]) -> None:
    for figure in FIGURES:
        register(figure)
