"""The NeuralSort-protocol table: Grover et al. 2019, Table 1, beside our cells of that protocol.

Literature rows are Table 1 of Grover et al. 2019 ("Average sorting accuracy on the test set";
first value: proportion of permutations correctly identified, in parentheses: proportion of
individual element ranks correctly identified), checked against the ICLR 2019 paper.

Our rows follow the paper's model selection (appendix D.1; ``tf/run_sort.py`` of
ermongroup/neuralsort): per cell, the evaluation (checkpoint) with the best validation
all-correct (``val/all_correct``; the first such on ties) and its test numbers
(``test/all_correct``, ``test/per_element_correct``); per ``n`` and method (an estimator, with
deterministic and stochastic NeuralSort apart), the temperature (sweep) with the best mean
validation all-correct over its seeds. Test numbers never choose anything.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from reports.schema import NA

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["GROVER_TABLE1", "OUR_METHODS", "SIZES", "method_of", "neuralsort_table", "selected_cells"]

SIZES = (3, 5, 7, 9, 15)
VAL, TEST, TEST_ITEM = "val/all_correct", "test/all_correct", "test/per_element_correct"

#: Grover et al. 2019, Table 1: method -> (all-correct, per-element) at n = 3, 5, 7, 9, 15.
GROVER_TABLE1: dict[str, tuple[tuple[float, float], ...]] = {
    "Vanilla RS": ((0.467, 0.801), (0.093, 0.603), (0.009, 0.492), (0.0, 0.113), (0.0, 0.067)),
    "Sinkhorn": ((0.462, 0.561), (0.038, 0.293), (0.001, 0.197), (0.0, 0.143), (0.0, 0.078)),
    "Gumbel-Sinkhorn": ((0.484, 0.575), (0.033, 0.295), (0.001, 0.189), (0.0, 0.146), (0.0, 0.078)),
    "Deterministic NeuralSort": (
        (0.930, 0.951), (0.837, 0.927), (0.738, 0.909), (0.649, 0.896), (0.386, 0.857)
    ),
    "Stochastic NeuralSort": (
        (0.927, 0.950), (0.835, 0.926), (0.741, 0.909), (0.646, 0.895), (0.418, 0.862)
    ),
}

#: Our estimators under this protocol, named for what they are.
OUR_METHODS: dict[str, str] = {
    "dense": "Deterministic NeuralSort (ours)",
    "gumbel_sinkhorn": "Gumbel-Sinkhorn, Mena et al.'s layout (ours)",
    "reinforce": "Plackett-Luce REINFORCE (ours, not in Grover et al.)",
    "sparse": "sparse quicksort (ours)",
}
STOCHASTIC_NEURALSORT = "Stochastic NeuralSort (ours)"


def method_of(run: pd.Series) -> str:
    """What a cell ran, named as the table names it: the ``dense`` estimator with Gumbel samples
    (``estimator.gumbel_samples`` > 0) is stochastic NeuralSort."""
    import pandas as pd

    estimator = run["estimator"]
    samples = pd.to_numeric(run.get("params.estimator.gumbel_samples"), errors="coerce")
    if estimator == "dense" and pd.notna(samples) and samples > 0:
        return STOCHASTIC_NEURALSORT
    return OUR_METHODS.get(estimator, f"{estimator} (ours)")


def selected_cells(runs: pd.DataFrame, frame: pd.DataFrame) -> pd.DataFrame:
    """One row per cell run of the NeuralSort protocol: its best-validation evaluation.

    Columns: the run's ``GROUP`` keys, ``method`` (``method_of``), ``n``, ``seed``, ``status``,
    ``data_source``, ``step``, ``val_all_correct``, ``all_correct``, ``per_element_correct`` (NaN
    where a cell has not evaluated yet).
    """
    import numpy as np
    import pandas as pd

    from reports.tables import GROUP

    protocol = runs.get("params.task.protocol", pd.Series("", index=runs.index))
    runs = runs[runs["task"].eq("sorting") & protocol.eq("neuralsort")]
    rows = []
    for _, run in runs.iterrows():
        row = {**{k: run[k] for k in GROUP}, "method": method_of(run),
               "n": int(run["params.task.n"]), "seed": run["seed"],
               "status": run["status"], "data_source": run["data_source"], "step": np.nan,
               "val_all_correct": np.nan, "all_correct": np.nan, "per_element_correct": np.nan}
        evals = frame[frame["run_id"].eq(run["run_id"])]
        if VAL in evals and evals[VAL].notna().any():
            best = evals.loc[evals[VAL].astype(float).idxmax()]  # first maximum: earliest step
            row.update(step=best["step"], val_all_correct=best[VAL],
                       all_correct=best[TEST], per_element_correct=best[TEST_ITEM])
        rows.append(row)
    columns = [*GROUP, "method", "n", "seed", "status", "data_source", "step", "val_all_correct",
               "all_correct", "per_element_correct"]
    return pd.DataFrame(rows, columns=columns)


def _fmt(all_correct: float, per_element: float, std: float = float("nan")) -> str:
    import math

    spread = "" if math.isnan(std) else f" ± {std:.3f}"
    return f"{all_correct:.3f}{spread} ({per_element:.3f})"


def neuralsort_table(runs: pd.DataFrame, frame: pd.DataFrame) -> pd.DataFrame:
    """Literature rows, then ours (per experiment and estimator), one column per ``n``.

    Every cell reads ``all-correct (per-element)``; ours are the mean (± std over seeds) at the
    selected temperature, or the cells' status where none has evaluated.
    """
    import pandas as pd

    from reports.tables import data_label

    table = [
        {"source": "Grover et al. 2019, Table 1", "method": method, "selected": "",
         "data": "MNIST 50k/10k/10k", **{f"n={n}": _fmt(*v) for n, v in zip(SIZES, values,
                                                                            strict=True)}}
        for method, values in GROVER_TABLE1.items()
    ]
    cells = selected_cells(runs, frame)
    for (experiment, method), mine in cells.groupby(["experiment", "method"], sort=False):
        row = {"source": f"ours ({experiment})", "method": method,
               "data": "; ".join(sorted({data_label(s) for s in mine["data_source"]}))}
        chosen = []
        for n, at_n in mine.groupby("n"):
            if at_n["status"].eq(NA).all():
                row[f"n={n}"] = "n/a"
                continue
            by_sweep = at_n.groupby("sweep", dropna=False)
            means = by_sweep["val_all_correct"].mean().dropna()
            if means.empty:
                row[f"n={n}"] = ", ".join(sorted(set(at_n["status"])))
                continue
            sweep = means.idxmax()
            best = by_sweep.get_group(sweep)
            row[f"n={n}"] = _fmt(best["all_correct"].mean(), best["per_element_correct"].mean(),
                                 best["all_correct"].std()) + f" [{best['seed'].nunique()} seeds]"
            chosen.append(f"n={n}: {sweep or 'no sweep'}")
        row["selected"] = "; ".join(chosen)
        table.append(row)
    sizes = sorted({*SIZES, *cells["n"]})
    columns = ["source", "method", *(f"n={n}" for n in sizes), "selected", "data"]
    return pd.DataFrame(table).reindex(columns=columns).fillna("")
