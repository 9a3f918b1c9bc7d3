"""Report items of the attention task: Table 1 (test error, the literature's and ours) and Fig. 4
(learned glimpses).

Table 1 keeps the literature apart from our runs: RAM's best error as the paper quotes it and the
paper's own sparse-layer numbers are ``literature`` rows; every estimator of ours is an ``ours``
row named after what it is (our REINFORCE glimpse is a one-shot Gaussian box policy, not RAM). An
``ours`` row of the sparse layer in one of the paper's glimpse configurations names the paper's
number for that configuration in ``compare_with``. Each cell's configuration comes from its params
``task.glimpses`` (count) and ``task.glimpse`` (glimpse side, pixels).

Collapsed seeds: a cell whose last evaluation logged ``val/collapsed = 1`` (every box corner
saturated, appendix A.1's failure) and whose param ``task.collapse`` is ``"drop"`` is left out of
its row's mean, as A.1 eliminates such runs; the row's ``dropped`` column names those seeds and
why. With ``"keep"`` (the default) every finished seed is averaged.

Ours are test errors on held-out test images. The paper's numbers may not be: see
``TABLE1_NOTE``.

Fig. 4 reads ``snapshots/step=<n>/glimpses.json`` of attention cells (the last snapshot of each
glimpse configuration)::

    {
      "step": int,
      "images": [m][H][W] float,          # m test images (one channel)
      "labels": [m] int,                  # optional: their classes
      "boxes": [m][g][4] float,           # each glimpse's box (y0, y1, x0, x1) in image pixels
      "glimpses": [m][g][k][k] float      # what each glimpse read
    }
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

__all__ = [
    "LITERATURE", "OURS", "TABLE1_NOTE", "collapsed_and_dropped", "draw_fig4", "draw_table1",
    "register_figures", "table1",
]

METRIC = "test/error_pct"
COLLAPSED = "val/collapsed"  # a training failure, judged without the test images
SNAPSHOT = "glimpses.json"
FIG4_EXAMPLES = 3  # images per glimpse configuration

#: Table 1's numbers: (what it is, (glimpses, size) for the paper's own configurations, error %).
LITERATURE: tuple[tuple[str, tuple[int, int] | None, float], ...] = (
    ("RAM, best reported on 100x100 cluttered MNIST (Mnih et al. 2014), as quoted in the paper's "
     "Table 1", None, 8.11),
    ("sparse hyperlayer, 1 glimpse of 32x32 (Bloem et al. 2018, Table 1)", (1, 32), 0.85),
    ("sparse hyperlayer, 8 glimpses of 12x12 (Bloem et al. 2018, Table 1)", (8, 12), 1.01),
)
#: What the paper's Table 1 numbers may have measured, against what ours measure.
TABLE1_NOTE = (
    "The paper's numbers may not be test errors: at the preprint (sparse-hyper 9664193), "
    "attention.experiment.py in its final mode trains on the train folder and scores "
    "testloader = DataLoader(train, ...), i.e. training images, and without that flag scores "
    "images 45,000-50,000 of the train folder (a validation split). Ours are test errors on the "
    "held-out test images, drawn from MNIST's test digits."
)
#: What each built-in estimator is on this task (others: "ours: <estimator>").
OURS: dict[str, str] = {
    "sparse": "ours: sparse hyperlayer (the paper's method)",
    "reinforce": "ours: REINFORCE, one-shot Gaussian-box glimpse (not RAM)",
    "dense": "ours: dense ConvNet baseline (Table 1 caption: the source network with a "
             "classification layer)",
    "bilinear": "ours: bilinear (STN-style) glimpse",
}


def _attention_runs(ctx: ReportContext) -> pd.DataFrame:
    return ctx.runs[ctx.runs["task"].eq("attention")]


def _config(group: pd.DataFrame) -> tuple[int, int] | None:
    """(glimpses, size) of a group of cells, from the params they logged."""
    import pandas as pd

    try:
        g = pd.to_numeric(group["params.task.glimpses"]).iloc[0]
        k = pd.to_numeric(group["params.task.glimpse"]).iloc[0]
    except (KeyError, ValueError):
        return None
    return (int(g), int(k)) if pd.notna(g) and pd.notna(k) else None


def _model(estimator: str, config: tuple[int, int] | None) -> str:
    label = OURS.get(estimator, f"ours: {estimator}")
    if estimator == "dense" or config is None:
        return label
    g, k = config
    return f"{label}, {g} glimpse{'s' if g > 1 else ''} of {k}x{k}"


def collapsed_and_dropped(runs: pd.DataFrame) -> pd.Series:
    """Per run: its last evaluation logged a collapse and its ``collapse`` policy drops it."""
    import pandas as pd

    from reports.tables import final_value

    if "params.task.collapse" not in runs or runs.empty:  # runs from before the policy existed
        return pd.Series(False, index=runs.index)
    return final_value(runs, COLLAPSED).eq(1.0) & runs["params.task.collapse"].eq("drop")


def table1(runs: pd.DataFrame) -> pd.DataFrame:
    """The literature's rows, then ours: test error per estimator and glimpse configuration (mean
    ± std over finished seeds, less those the collapse policy drops; the best sweep), each row
    labelled with what it is."""
    import pandas as pd

    from reports.schema import FINISHED
    from reports.tables import GROUP, best_sweeps, data_label, final_value, mean_std

    rows = [{
        "section": "literature", "model": model, "glimpses": config[0] if config else None,
        "size": f"{config[1]}x{config[1]}" if config else "", "error_pct": f"{error:g}",
        "error_pct_mean": error,
    } for model, config, error in LITERATURE]
    runs = best_sweeps(runs)  # chosen on val/error_pct
    dropped = collapsed_and_dropped(runs)
    runs = runs.assign(_final=final_value(runs, METRIC).where(runs["status"].eq(FINISHED) & ~dropped),
                       _dropped=dropped)
    for key, group in runs.groupby(GROUP, sort=False):
        cell = dict(zip(GROUP, key, strict=True))
        config = _config(group)
        paper = [f"{model}: {error:g} %" for model, c, error in LITERATURE[1:]
                 if cell["estimator"] == "sparse" and c == config]
        statuses = group["status"].value_counts()
        rows.append({
            "section": "ours",
            "model": _model(cell["estimator"], config),
            "glimpses": config[0] if config else None,
            "size": f"{config[1]}x{config[1]}" if config else "",
            "error_pct": mean_std(group["_final"]) or "; ".join(f"{n} {s}" for s, n in statuses.items()),
            "error_pct_mean": group["_final"].mean(),
            **cell,
            "seeds": len(group),
            "status": ", ".join(f"{n} {s}" for s, n in statuses.items()),
            "dropped": ", ".join(f"seed {seed} (collapsed: every box corner saturated, A.1)"
                                 for seed in group.loc[group["_dropped"], "seed"]),
            "data": "; ".join(sorted({data_label(s) for s in group["data_source"]})),
            "compare_with": paper[0] if paper else "",
        })
    columns = ["section", "model", "glimpses", "size", "error_pct", "error_pct_mean", *GROUP,
               "seeds", "status", "dropped", "data", "compare_with"]
    return pd.DataFrame(rows).reindex(columns=columns)


def draw_table1(ctx: ReportContext) -> list[Path]:
    """Table 1 as CSV and HTML."""
    from reports.tables import write_table

    return write_table(table1(_attention_runs(ctx)), ctx.out_dir, "table1_attention",
                       "Table 1: attention, test error")


def draw_fig4(ctx: ReportContext) -> list[Path]:
    """Per glimpse configuration: test images with the glimpse boxes, and what each glimpse read
    (blue positive, red negative, yellow near zero, as in the paper). The contents are read as the
    cell's ``glimpse_eval`` says (``"rounded"``: the pixel at each rounded point; ``"sampled"``:
    one seeded training-mode read, as the authors' layer reads at test time); the boxes are the
    same either way. Each panel's title names the reading."""
    import numpy as np
    from matplotlib.patches import Rectangle

    from reports.frame import natural_key
    from reports.plotting import plt, save
    from reports.schema import FINISHED

    runs = _attention_runs(ctx)
    runs = runs.assign(_rank=runs["estimator"].ne("sparse"), _unfinished=runs["status"].ne(
        FINISHED)).sort_values(["_rank", "_unfinished", "seed"], kind="stable")
    shown: list[tuple[pd.Series, int, dict]] = []
    for variant in sorted(runs["variant"].unique(), key=natural_key):
        for _, run in runs[runs["variant"].eq(variant)].iterrows():
            snaps = ctx.snapshots(run["run_id"], SNAPSHOT)
            if not snaps:
                continue
            step, path = next(reversed(snaps.items()))
            data = json.loads(path.read_text())
            if "boxes" in data:  # the dense baseline takes no glimpse
                shown.append((run, step, data))
                break
    if not shown:
        raise NoFigureData(f"no attention cell has logged snapshots/step=<n>/{SNAPSHOT}")
    width = max(1 + len(data["boxes"][0]) for _, _, data in shown)
    examples = [min(FIG4_EXAMPLES, len(data["images"])) for _, _, data in shown]
    fig = plt.figure(figsize=(1.5 * width + 0.5, 1.6 * sum(examples) + 0.6 * len(shown)),
                     layout="constrained")
    subfigs = np.atleast_1d(fig.subfigures(len(shown), 1, height_ratios=examples))
    for subfig, (run, step, data), m in zip(subfigs, shown, examples, strict=True):
        axes = subfig.subplots(m, width, squeeze=False)
        for i in range(m):
            axes[i, 0].imshow(np.asarray(data["images"][i]), cmap="gray_r")
            for y0, y1, x0, x1 in data["boxes"][i]:
                axes[i, 0].add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False,
                                               edgecolor="tab:orange", linewidth=1))
            for j, glimpse in enumerate(data["glimpses"][i], start=1):
                g = np.asarray(glimpse)
                lim = float(np.abs(g).max()) or 1.0  # symmetric, so zero is yellow
                axes[i, j].imshow(g, cmap="RdYlBu", vmin=-lim, vmax=lim)
            for ax in axes[i]:
                ax.set_axis_off()
        reading = run.get("params.task.glimpse_eval")
        reading = reading if isinstance(reading, str) else "rounded"  # runs before the option
        subfig.suptitle(f"{run['variant']}, {run['estimator']} (seed {run['seed']}, step {step}; "
                        f"glimpses read {reading})", fontsize=9)
    fig.suptitle("Fig. 4: learned glimpses on test images")
    return save(fig, ctx.out_dir, "fig4_attention_glimpses")


FIGURES = (
    Figure(
        name="table1_attention",
        task="attention",
        title="Table 1: attention, test error per estimator and glimpse configuration",
        paper_note=(
            "Test error on 100x100 cluttered MNIST (60k train / 10k test, deepmind/mnist-cluttered): "
            "RAM (best reported, Mnih et al. 2014) 8.11 %, sparse layer with 1 glimpse of 32x32 "
            "0.85 %, with 8 glimpses of 12x12 1.01 %. These are the table's literature rows; our "
            "rows follow, each named after what it is (our REINFORCE glimpse is not RAM). "
            + TABLE1_NOTE
        ),
        draw=draw_table1,
    ),
    Figure(
        name="fig4_attention_glimpses",
        task="attention",
        title="Fig. 4: attention, the learned glimpses",
        paper_note=(
            "Glimpses after the final epoch, 1-glimpse network above, 8-glimpse network below; "
            "positive values blue, negative red, near zero yellow. The 1-glimpse network often "
            "reads only part of the digit; the 8-glimpse network covers more of it."
        ),
        draw=draw_fig4,
    ),
)


@hookimpl
def register_figures(register: Callable[[Figure], None]) -> None:
    for figure in FIGURES:
        register(figure)
