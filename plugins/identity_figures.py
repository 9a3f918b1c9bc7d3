"""Report figures of the identity task: Fig. 2 (test MSE against iterations) and Fig. 3
(snapshots of the sparse layer).

Fig. 3 reads ``snapshots/step=<n>/layer.json`` of an identity cell, as ``plugins.identity``
writes it: ``{"step": int, "n": int, "means": [[row, col], ...] (k, 2), "sigmas": (k, 2),
"values": (k,), "samples": [[row, col], ...] (integer tuples)}``.
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

__all__ = ["draw_fig2", "draw_fig3", "fig2_grid", "register_figures"]

METRIC = "test/mse"
SNAPSHOT = "layer.json"
FIG3_N = 32  # the paper's Fig. 3 shows the size-32 layer
FIG3_PANELS = 5  # the paper shows five moments of training


def _identity_runs(ctx: ReportContext) -> pd.DataFrame:
    return ctx.runs[ctx.runs["task"].eq("identity")]


def draw_fig2(ctx: ReportContext) -> list[Path]:
    """Fig. 2 (see ``fig2_grid``) as PNG and SVG."""
    from reports.plotting import save

    return save(fig2_grid(ctx).figure, ctx.out_dir, "fig2_identity")


def fig2_grid(ctx: ReportContext):  # -> seaborn.FacetGrid, one facet per experiment
    """Fig. 2 as the authors drew it (sparse-hyper ``plot.identity.py`` at the preprint): test MSE
    against iterations, both axes linear (the script sets no x scale), MSE from 0
    (``set_ylim(bottom=0)``), every evaluation from step 0 on (``np.arange(ndots) * dot_every``),
    colour by size, the sparse layer solid and REINFORCE dashed; every other estimator has its own
    dash pattern and marker, and the title names the style of every estimator drawn. Error
    bars: std over seeds. Per size, each estimator's best sweep on validation MSE (the paper
    reports REINFORCE at its best learning rate)."""
    import numpy as np
    import pandas as pd

    from reports.plotting import dashes_for, markers_for, sns, styles_caption
    from reports.tables import best_sweeps

    runs = best_sweeps(_identity_runs(ctx))  # chosen on val/mse, shown on test/mse
    frame = ctx.frame
    logged = frame[METRIC].notna() if METRIC in frame else pd.Series(False, index=frame.index)
    data = frame[frame["run_id"].isin(runs["run_id"]) & logged]
    if data.empty:
        raise NoFigureData(f"no identity cell has logged {METRIC} yet")
    n = pd.to_numeric(data["variant"].str.extract(r"n=(\d+)")[0], errors="coerce")
    data = data.assign(size=[f"n = {v:.0f}" if pd.notna(v) else str(w)
                             for v, w in zip(n, data["variant"], strict=True)],
                       _n=n.fillna(np.inf))
    sizes = list(dict.fromkeys(data.sort_values("_n")["size"]))
    estimators = sorted(data["estimator"].unique(), key=lambda e: (e != "sparse", e != "reinforce", e))
    grid = sns.relplot(
        data=data, x="step", y=METRIC, kind="line", col="experiment",
        hue="size", hue_order=sizes, palette=dict(zip(sizes, sns.color_palette("Set1", len(sizes)),
                                                      strict=True)),
        style="estimator", style_order=estimators, dashes=dashes_for(estimators),
        markers=markers_for(estimators), markersize=4, errorbar="sd", err_style="bars",
        height=4.2, aspect=1.5, facet_kws={"sharey": False},
    )
    for ax in grid.axes.flat:
        ax.set_ylim(bottom=0)
    grid.set_axis_labels("iterations", "test MSE (rounded means)")
    swept = runs[runs["sweep"].ne("")].drop_duplicates(["experiment", "variant", "estimator"])
    if len(swept):
        chosen = "; ".join(f"{r.variant} {r.estimator}: {r.sweep}" for r in swept.itertuples())
        grid.figure.text(0.01, -0.02, f"best sweep per n (lowest final val/mse): {chosen}",
                         fontsize=7, ha="left", va="top", wrap=True)
    styles = styles_caption(estimators, dashes_for(estimators), markers_for(estimators))
    grid.figure.suptitle(f"Fig. 2: identity, test MSE against iterations (colour: size; {styles}; "
                         "std over seeds)", y=1.03, wrap=True)
    return grid


def _fig3_candidates(runs: pd.DataFrame) -> pd.DataFrame:
    """Sparse identity cells, best first: finished, the paper's n = 32, else the largest n."""
    import pandas as pd

    from reports.schema import FINISHED

    runs = runs[runs["estimator"].eq("sparse")]
    n = pd.to_numeric(runs.get("params.task.n", runs["variant"].str.extract(r"(\d+)")[0]),
                      errors="coerce")
    key = pd.DataFrame({
        "unfinished": runs["status"].ne(FINISHED),
        "not_paper_n": n.ne(FIG3_N),
        "minus_n": -n.fillna(0),
        "seed": runs["seed"].fillna(0),
    }, index=runs.index)
    return runs.loc[key.sort_values(list(key.columns), kind="stable").index]


def _pick_steps(steps: list[int], count: int) -> list[int]:
    """Up to ``count`` steps spread over the run, first and last included."""
    if len(steps) <= count:
        return steps
    last = len(steps) - 1
    return [steps[round(i * last / (count - 1))] for i in range(count)]


def draw_fig3(ctx: ReportContext) -> list[Path]:
    """The sparse layer at chosen iterations: means as solid blue circles, sigmas as transparent
    circles, sampled integer tuples as gray diamonds (row index downwards, as in a matrix)."""
    import numpy as np
    from matplotlib.patches import Ellipse

    from reports.plotting import plt, save

    for _, run in _fig3_candidates(_identity_runs(ctx)).iterrows():
        snaps = ctx.snapshots(run["run_id"], SNAPSHOT)
        if snaps:
            break
    else:
        raise NoFigureData(f"no sparse identity cell has logged snapshots/step=<n>/{SNAPSHOT}")
    steps = _pick_steps(list(snaps), FIG3_PANELS)
    fig, axes = plt.subplots(1, len(steps), figsize=(3.1 * len(steps), 3.4), squeeze=False)
    for ax, step in zip(axes[0], steps, strict=True):
        layer = json.loads(snaps[step].read_text())
        means, sigmas = layer["means"], layer["sigmas"]
        if any(len(m) != 2 for m in means):
            raise NoFigureData(f"{SNAPSHOT} of run {run['run_name']} is not a rank-2 layer")
        n = int(layer.get("n") or max(max(m) for m in means) + 1)
        for (row, col), (s_row, s_col) in zip(means, sigmas, strict=True):
            # sigma is a variance (Algorithm 1): the circle spans one standard deviation
            ax.add_patch(Ellipse((col, row), 2 * s_col**0.5, 2 * s_row**0.5, color="tab:blue",
                                 alpha=0.15, linewidth=0))
        if layer.get("samples"):
            samples = np.asarray(layer["samples"]).reshape(-1, 2)  # (k, s, 2) or (k, 2)
            ax.scatter(samples[:, 1], samples[:, 0], marker="D", s=10, color="gray", alpha=0.6,
                       linewidths=0)
        ax.scatter([m[1] for m in means], [m[0] for m in means], s=14, color="tab:blue")
        ax.set(xlim=(-0.5, n - 0.5), ylim=(n - 0.5, -0.5), aspect="equal", title=f"step {step}")
        ax.set_xticks([0, n - 1])
        ax.set_yticks([0, n - 1])
    fig.suptitle(f"Fig. 3: sparse layer during training, {run['run_name']}", y=1.02)
    return save(fig, ctx.out_dir, "fig3_identity_layer")


FIGURES = (
    Figure(
        name="fig2_identity",
        task="identity",
        title="Fig. 2: identity, test MSE against iterations",
        paper_note=(
            "Mean-squared error (linear, from 0) against iterations (linear, 0 to 120k), "
            "colour = size: REINFORCE dashed at n = 4, 8, 16 (best of nine learning rates, 120k "
            "iterations), the sparse layer solid at n = 8, 16, 32, 64; error bars = std over "
            "runs. REINFORCE learns slowly up to n = 8 and fails at n = 16; the sparse layer "
            "converges up to n = 64 (the first three sparse runs stopped after 10k, 20k and 40k "
            "iterations)."
        ),
        draw=draw_fig2,
    ),
    Figure(
        name="fig3_identity_layer",
        task="identity",
        title="Fig. 3: identity, the sparse layer during training",
        paper_note=(
            "The n = 32 layer after 0, 1,000, 5,000, 9,000 and 13,000 batches: solid blue "
            "circles = means of the continuous index tuples, transparent circles = their "
            "variance, gray diamonds = sampled integer tuples. Most tuples reach the diagonal "
            "quickly; the last few take many more iterations."
        ),
        draw=draw_fig3,
    ),
)


@hookimpl
def register_figures(register: Callable[[Figure], None]) -> None:
    for figure in FIGURES:
        register(figure)
