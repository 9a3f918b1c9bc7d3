"""Report figures of the estimators' gradients (issue 21).

- ``grad_<task>`` (one per training task): relative variance and SNR of the gradient
  (``harness.run.diagnostics``, ``grad/all/...``) against the training step, a column per task
  variant, one line per estimator (and sweep value); a table beside it of each cell's measurements
  averaged over training. Drawn from cells run with ``[diagnostics]`` on.
- ``gradient_study_<task>`` (``study_permutation``, ``study_matrix``, ``study_glimpse``;
  ``plugins.gradient_study``):
  squared bias and variance against the number of samples per estimate, log-log, the
  literature's bias-variance plot; estimators that declare no distribution have no bias line and
  are marked "(no distribution)" in the legend and the table, never dropped.
- ``gradient_temperature_study_permutation``: the same numbers at the largest sample count
  against a swept temperature (``tau``, ``temperature``), one line per estimator and the rest of
  its sweep: stochastic NeuralSort's bias against tau, Gumbel-Sinkhorn's variance (marked).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from harness.hookspecs import hookimpl
from reports.figure import Figure, NoFigureData, ReportContext
from reports.schema import DIAGNOSTICS_COST, DIAGNOSTICS_TAG

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["diagnostics_table", "gradient_history", "register_figures", "study_table", "temperature_table"]

TRAINING_TASKS = ("identity", "attention", "sorting")
STUDY_TASKS = ("study_permutation", "study_matrix", "study_glimpse")
CURVES = ("grad/all/rel_var", "grad/all/snr")
TABLED = ("rel_var", "snr", "cosine", "sampling_share")
UNMARKED = "(no distribution)"


def _label(run: pd.Series) -> str:
    return f"{run['estimator']} {run['sweep']}".strip()


def gradient_history(ctx: ReportContext, task: str) -> pd.DataFrame:
    """A row per measurement of every ``task`` cell run with diagnostics: cell columns, step and
    each ``grad/all/...`` statistic and the cost."""
    import pandas as pd

    runs = ctx.runs[ctx.runs["task"].eq(task)]
    tag = f"tags.{DIAGNOSTICS_TAG}"
    if tag not in runs:
        raise NoFigureData(f"no {task} cell was run with [diagnostics] on")
    runs = runs[runs[tag].fillna("").ne("")]
    if runs.empty:
        raise NoFigureData(f"no {task} cell was run with [diagnostics] on")
    keys = [k.removeprefix("metrics.") for k in ctx.runs.columns
            if k.startswith("metrics.grad/all/") or k == f"metrics.{DIAGNOSTICS_COST}"]
    rows = []
    for _, run in runs.iterrows():
        points: dict[int, dict[str, float]] = {}
        for key in keys:
            for m in ctx.client.get_metric_history(run["run_id"], key):
                points.setdefault(m.step, {})[key] = m.value
        for step, values in sorted(points.items()):
            rows.append({"variant": run["variant"], "estimator": run["estimator"], "sweep": run["sweep"],
                         "seed": run["seed"], "line": _label(run), "step": step, **values})
    return pd.DataFrame(rows)


def diagnostics_table(history: pd.DataFrame) -> pd.DataFrame:
    """Each variant and estimator's measurements, averaged over steps and seeds."""
    columns = {f"grad/all/{k}": k for k in TABLED} | {DIAGNOSTICS_COST: "seconds per measurement"}
    present = {k: v for k, v in columns.items() if k in history}
    table = history.groupby(["variant", "line"], sort=False)[list(present)].mean().reset_index()
    return table.rename(columns={"line": "estimator", **present})


def _draw_training(task: str) -> Callable[[ReportContext], list[Path]]:
    def draw(ctx: ReportContext) -> list[Path]:
        from reports.frame import natural_key
        from reports.plotting import plt, save, sns
        from reports.tables import write_table

        history = gradient_history(ctx, task)
        variants = sorted(dict.fromkeys(history["variant"]), key=natural_key)
        lines = sorted(dict.fromkeys(history["line"]))
        colours = dict(zip(lines, sns.color_palette("tab10", len(lines)), strict=True))
        fig, axes = plt.subplots(len(CURVES), len(variants), figsize=(4 * len(variants), 6.5),
                                 squeeze=False, sharex="col")
        for col, variant in enumerate(variants):
            part = history[history["variant"].eq(variant)]
            for row, metric in enumerate(CURVES):
                ax = axes[row][col]
                for line, data in part.groupby("line", sort=True):
                    mean = data.groupby("step")[metric].mean().dropna() if metric in data else None
                    if mean is None or mean.empty:  # undefined: nothing varies (a deterministic layer)
                        ax.plot([], [], color=colours[line], label=f"{line}: undefined")
                    elif (mean <= 0).all():  # zero variance has no place on a log axis: say it
                        ax.plot([], [], color=colours[line], label=f"{line}: 0")
                    else:
                        ax.plot(mean.index, mean.values, marker="o", markersize=3, color=colours[line],
                                label=line)
                ax.set_yscale("log")
                ax.set_title(f"{variant}" if row == 0 else "")
                ax.set_ylabel(metric.removeprefix("grad/all/") if col == 0 else "")
                ax.set_xlabel("step" if row == len(CURVES) - 1 else "")
                if col == len(variants) - 1:
                    ax.legend(fontsize=7)
        fig.suptitle(f"{task}: gradient relative variance (top) and SNR (bottom) during training")
        fig.tight_layout()
        paths = save(fig, ctx.out_dir, f"grad_{task}")
        return paths + write_table(diagnostics_table(history), ctx.out_dir, f"grad_{task}_table",
                                   f"{task}: gradient statistics averaged over training")

    return draw


def study_table(runs: pd.DataFrame) -> pd.DataFrame:
    """A row per finished study cell and sample count: variance, squared bias and MSE (relative to
    the exact gradient's squared norm), and whether the estimator declares its distribution."""
    import pandas as pd

    rows = []
    for _, run in runs[runs["status"].eq("finished")].iterrows():
        metrics = {k.removeprefix("metrics.test/"): v for k, v in run.items()
                   if k.startswith("metrics.test/") and pd.notna(v)}
        declared = metrics.get("declared", 0.0) == 1.0
        counts = sorted({int(k.removeprefix("var_s")) for k in metrics if k.startswith("var_s")})
        for s in counts:
            rows.append({
                "variant": run["variant"],
                "estimator": _label(run) + ("" if declared else f" {UNMARKED}"),
                "samples": s,
                "variance": metrics.get(f"var_s{s}"),
                "bias2": metrics.get(f"bias2_s{s}") if declared else None,
                "mse": metrics.get(f"mse_s{s}") if declared else None,
                "cosine to exact": metrics.get(f"cos_s{s}") if declared else None,
            })  # fmt: skip
    return pd.DataFrame(rows)


def _bias_variance_figure(
    table: pd.DataFrame, x: str, xlabel: str, xbase: float, title: str,
    rows: Callable[[pd.DataFrame], pd.DataFrame], suffix: Callable[[pd.DataFrame], str],
):  # -> matplotlib Figure
    """Variance (solid) and bias² (dashed) against ``x``, a panel per variant and a colour per
    estimator; ``rows`` picks a panel's rows, ``suffix`` adds to an estimator's label. An estimator
    with no distribution has no bias line (its label says so); a line with no positive value shows
    as "0" in the legend (a log axis has no place for it)."""
    from reports.frame import natural_key
    from reports.plotting import plt

    variants = sorted(dict.fromkeys(table["variant"]), key=natural_key)
    fig, axes = plt.subplots(1, len(variants), figsize=(5 * len(variants), 4.2), squeeze=False)
    for ax, variant in zip(axes[0], variants, strict=True):
        for name, data in rows(table[table["variant"].eq(variant)]).groupby("estimator", sort=True):
            colour = None
            for column, style in (("variance", "-o"), ("bias2", "--x")):
                values = data.set_index(x)[column].astype(float).dropna()
                if values.empty:
                    continue
                shown = values[values > 0]
                label = f"{name}: {column.replace('2', '²')}{suffix(data)}" + (" 0" if shown.empty else "")
                (line,) = ax.plot(shown.index, shown.values, style, color=colour, label=label)
                colour = line.get_color()
        ax.set_xscale("log", base=xbase)
        ax.set_yscale("log")
        ax.set_title(variant)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("relative to ||exact gradient||² (else ||mean||²)")
    legend = {label: handle for ax in axes[0] for handle, label in zip(*ax.get_legend_handles_labels(),
                                                                        strict=True)}
    fig.suptitle(title)
    fig.tight_layout()
    fig.legend(legend.values(), legend.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 0.95))
    return fig


def _draw_study(task: str) -> Callable[[ReportContext], list[Path]]:
    def draw(ctx: ReportContext) -> list[Path]:
        from reports.plotting import save
        from reports.tables import write_table

        table = study_table(ctx.runs[ctx.runs["task"].eq(task)])
        if table.empty:
            raise NoFigureData(f"no {task} cell has finished")
        fig = _bias_variance_figure(
            table, "samples", "samples per estimate", 2,
            f"{task}: bias² and variance of each estimator's gradient",
            rows=lambda part: part, suffix=lambda data: "",
        )
        return save(fig, ctx.out_dir, f"gradient_{task}") + write_table(
            table, ctx.out_dir, f"gradient_{task}_table", f"{task}: bias, variance and MSE"
        )

    return draw


TEMPERATURES = ("tau", "temperature")  # the estimator parameters a study sweeps as a temperature


def temperature_table(runs: pd.DataFrame) -> pd.DataFrame:
    """The study table's rows of cells whose sweep sets a temperature (``tau``, ``temperature``),
    with the temperature as a column and the rest of the sweep in the estimator's label: a
    relaxation's bias and variance against its temperature (stochastic NeuralSort's bias against
    the Plackett-Luce gradient; a relaxation without a distribution, variance only, marked)."""
    import pandas as pd

    parts = []
    for _, run in runs.iterrows():
        setting = dict(p.split("=", 1) for p in str(run["sweep"]).split(",") if "=" in p)
        key = next((k for k in TEMPERATURES if k in setting), None)
        if key is None:
            continue
        temperature = float(setting.pop(key))
        rows = study_table(run.to_frame().T)
        if rows.empty:
            continue
        rest = ",".join(f"{k}={v}" for k, v in setting.items())
        marked = rows["estimator"].iloc[0].endswith(UNMARKED)
        label = f"{run['estimator']} {rest}".strip() + (f" {UNMARKED}" if marked else "")
        parts.append(rows.assign(estimator=label, temperature=temperature, parameter=key))
    if not parts:
        return pd.DataFrame()
    table = pd.concat(parts, ignore_index=True)
    return table.sort_values(["variant", "estimator", "samples", "temperature"], ignore_index=True)


def _draw_temperature(task: str) -> Callable[[ReportContext], list[Path]]:
    def draw(ctx: ReportContext) -> list[Path]:
        from reports.plotting import save
        from reports.tables import write_table

        table = temperature_table(ctx.runs[ctx.runs["task"].eq(task)])
        if table.empty:
            raise NoFigureData(f"no finished {task} cell sweeps a temperature")

        def largest_samples(part: pd.DataFrame) -> pd.DataFrame:
            return part[part["samples"].eq(part.groupby("estimator")["samples"].transform("max"))]

        fig = _bias_variance_figure(
            table, "temperature", "temperature (tau, temperature)", 10,
            f"{task}: bias² and variance against the relaxation's temperature",
            rows=largest_samples, suffix=lambda data: f" (S = {int(data['samples'].iloc[0])})",
        )
        return save(fig, ctx.out_dir, f"gradient_temperature_{task}") + write_table(
            table, ctx.out_dir, f"gradient_temperature_{task}_table",
            f"{task}: bias, variance and MSE against the temperature",
        )

    return draw


FIGURES = [
    *(Figure(f"grad_{task}", task, f"Gradient diagnostics: {task}, relative variance and SNR against step",
             "not in the paper: issue 21's gradient statistics (cells run with [diagnostics])",
             _draw_training(task)) for task in TRAINING_TASKS),
    *(Figure(f"gradient_{task}", task, f"Gradient study: {task}, bias² and variance against samples",
             "not in the paper: the exact gradient from StructureLayer.outcomes; unmarked estimators "
             "declare no distribution (variance only)", _draw_study(task)) for task in STUDY_TASKS),
    Figure("gradient_temperature_study_permutation", "study_permutation",
           "Gradient study: study_permutation, bias² and variance against the temperature",
           "not in the paper: stochastic NeuralSort against the Plackett-Luce gradient of its keys; "
           "relaxations without a distribution marked (variance only)",
           _draw_temperature("study_permutation")),
]  # fmt: skip


@hookimpl
def register_figures(register: Callable[[Figure], None]) -> None:
    for figure in FIGURES:
        register(figure)
