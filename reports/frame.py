"""Read a sparsebench tracking store into pandas: a runs table and the tidy frame.

The report reads the store only (never runner internals), so any store written in the layout,
by any version of the runner or by hand, can be reported on. Cells are child runs tagged
``sparsebench.role = "cell"``; parent (``matrix``) and ``report`` runs are never read as cells.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pandas as pd
from mlflow.entities import Experiment, Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from reports import schema
from reports.errors import ReportError, StoreReadError

__all__ = ["CELL_COLUMNS", "ENTRY", "StoreData", "display_uri", "natural_key", "read_store"]


#: frame column -> the tag it comes from; every cell carries these (empty string when untagged).
CELL_COLUMNS: dict[str, str] = {
    "cell_id": schema.CELL_ID_TAG,
    "task": schema.TASK_TAG,
    "variant": schema.VARIANT_TAG,
    "estimator": schema.ESTIMATOR_TAG,
    "seed": schema.SEED_TAG,
    "sweep": schema.SWEEP_TAG,
    "kind": schema.KIND_TAG,
    "status": schema.STATUS_TAG,
    "reason": schema.REASON_TAG,
    "stopped": schema.STOPPED_TAG,  # why the stop rule ended the cell early, else ""
    "target": schema.TARGET_TAG,  # the task's target on a val metric ("val/mse <= 0"), else ""
    "primary_metric": schema.PRIMARY_METRIC_TAG,
    "select_metric": schema.SELECT_METRIC_TAG,  # the val/ metric selections read ("" before issue 19)
    "device": schema.DEVICE_TAG,
    "data_source": schema.DATA_TAG_PREFIX + "source",
    "task_code": schema.CODE_TAG_PREFIX + "task",  # the task plugin's distribution and version
    "estimator_code": schema.CODE_TAG_PREFIX + "estimator",
}
#: A matrix entry: the cells of one estimator on one task variant. Cells of an entry that differ in
#: anything but the seed (a sweep value, another setting, another plugin version) are kept apart.
ENTRY = ["experiment", "task", "variant", "estimator"]
_CONFIG_PREFIXES = ("params.task.", "params.estimator.")
_CODE_COLUMNS = {"task_code": "task code", "estimator_code": "estimator code"}
# Metrics whose history makes the rows of the tidy frame (one row per evaluation step).
_ROW_PREFIXES = ("val/", "test/", "eval/", "time/")  # eval/: stores written before issue 19


@dataclass(frozen=True)
class StoreData:
    """What a report is drawn from."""

    uri: str
    experiments: dict[str, str]  # experiment id -> name, of the experiments read
    runs: pd.DataFrame  # a row per cell (latest run per cell id)
    frame: pd.DataFrame  # a row per cell per evaluation step (one row with step <NA> if none)


def natural_key(text: str) -> tuple[object, ...]:
    """Sort key that orders "n=8" before "n=16" (digit runs compare as numbers)."""
    return tuple(int(p) if i % 2 else p for i, p in enumerate(re.split(r"(\d+)", str(text))))


def display_uri(uri: str) -> str:
    """The store URI without user:password, for messages and the report page."""
    parts = urlsplit(uri)
    if parts.password is None and parts.username is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


def _check_exists(uri: str) -> None:
    """A missing local store is a usage error; MLflow would silently create an empty one."""
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///").split("?", 1)[0])
    elif uri.startswith("file:") or "://" not in uri:
        path = Path(urlsplit(uri).path if uri.startswith("file:") else uri)
    else:
        return
    if not path.exists():
        raise ReportError(
            f"no tracking store at {display_uri(uri)} ({path} does not exist); "
            "run `sparsebench run` first or point --tracking-uri at an existing store"
        )


def _experiments(client: MlflowClient, names: Sequence[str] | None, uri: str) -> list[Experiment]:
    found: list[Experiment] = []
    token = None
    while True:
        page = client.search_experiments(max_results=1000, page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            break
    if names is None:
        return found
    by_name = {e.name: e for e in found}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ReportError(
            f"experiment(s) {', '.join(map(repr, missing))} not in the tracking store "
            f"{display_uri(uri)}; it holds {', '.join(sorted(by_name)) or 'none'}"
        )
    return [by_name[n] for n in names]


def _cell_runs(client: MlflowClient, experiment_ids: list[str]) -> Iterator[Run]:
    token = None
    while True:
        page = client.search_runs(
            experiment_ids, schema.CELLS_FILTER, max_results=1000, page_token=token,
            order_by=["attributes.start_time DESC"],
        )
        yield from page
        token = page.token
        if not token:
            return


def _run_row(run: Run, experiments: dict[str, str]) -> dict[str, object]:
    tags = run.data.tags
    row: dict[str, object] = {
        "experiment_id": run.info.experiment_id,
        "experiment": experiments[run.info.experiment_id],
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        "parent_run_id": tags.get("mlflow.parentRunId", ""),
        "mlflow_status": run.info.status,
        "start_time": pd.to_datetime(run.info.start_time, unit="ms", utc=True),
    }
    row.update({col: tags.get(tag, "") for col, tag in CELL_COLUMNS.items()})
    row.update({f"metrics.{k}": v for k, v in run.data.metrics.items()})  # final (latest step)
    row.update({f"params.{k}": v for k, v in run.data.params.items()})
    row.update({f"tags.{k}": v for k, v in tags.items()})
    return row


def _history(client: MlflowClient, run_id: str, key: str) -> pd.DataFrame:
    """step -> value of one metric; the last logged value wins where a step was logged twice."""
    points = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    hist = pd.DataFrame({"step": [m.step for m in points], key: [m.value for m in points]})
    return hist.drop_duplicates("step", keep="last")


def _cell_frame(client: MlflowClient, run: pd.Series, keys: list[str]) -> pd.DataFrame:
    """The evaluation rows of one cell; train metrics are taken at the latest step <= each row's."""
    # the diagnostics' cost is logged at measured steps, not evaluations: no rows of its own
    row_keys = [k for k in keys if k.startswith(_ROW_PREFIXES) and k != schema.DIAGNOSTICS_COST]
    if row_keys:
        cell = _history(client, run["run_id"], row_keys[0])
        for key in row_keys[1:]:
            cell = cell.merge(_history(client, run["run_id"], key), on="step", how="outer")
        cell = cell.sort_values("step", ignore_index=True)
        for key in (k for k in keys if k.startswith("train/")):
            cell = pd.merge_asof(cell, _history(client, run["run_id"], key), on="step")
    else:
        cell = pd.DataFrame({"step": [pd.NA]})
    for key in (k for k in keys if k.startswith("summary/")):
        cell[key] = run[f"metrics.{key}"]
    for col in ("experiment", "run_id", "run_name", *CELL_COLUMNS, "settings"):
        cell[col] = run[col]
    primary, select = run["primary_metric"], run["select_metric"]
    cell["primary"] = cell[primary] if primary in cell else float("nan")
    cell["select"] = cell[select] if select in cell else float("nan")
    return cell


def _settings(runs: pd.DataFrame) -> pd.Series:
    """What sets each cell apart from the other cells of its entry and sweep, seed aside: the
    parameters and plugin versions that differ between them (``"steps=500"``), else ``""``.

    Together with the entry and the sweep this is the cell's whole resolved config except the
    seed, so grouping on it never pools cells that were configured differently.
    """
    keys = [c for c in runs.columns if c.startswith(_CONFIG_PREFIXES)] + list(_CODE_COLUMNS)
    values = runs[keys].astype("string").fillna("-")
    out = pd.Series("", index=runs.index, dtype=object)
    for _, group in values.groupby([runs[c] for c in [*ENTRY, "sweep"]], dropna=False, sort=False):
        varying = [k for k in keys if group[k].nunique() > 1]
        for idx, row in group[varying].iterrows():
            out[idx] = ", ".join(
                f"{_CODE_COLUMNS[k]}: {row[k]}" if k in _CODE_COLUMNS else f"{k.rsplit('.', 1)[1]}={row[k]}"
                for k in varying
            )
    return out


def read_store(tracking_uri: str, experiment_names: Sequence[str] | None = None) -> StoreData:
    """Read the cell runs of the named experiments (all experiments if ``None``).

    Where a cell id was run more than once (``--force``, a resumed ``KILLED`` run), the latest
    run stands for the cell. Raises ``ReportError`` naming the store when it is absent or holds
    no cell runs, ``StoreReadError`` when it cannot be read.
    """
    _check_exists(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        return _read(client, tracking_uri, experiment_names)
    except MlflowException as e:
        raise StoreReadError(f"cannot read tracking store {display_uri(tracking_uri)}: {e}") from e


def _read(client: MlflowClient, uri: str, experiment_names: Sequence[str] | None) -> StoreData:
    experiments = {e.experiment_id: e.name for e in _experiments(client, experiment_names, uri)}
    found = list(_cell_runs(client, list(experiments)))
    if not found:
        which = ", ".join(experiments.values()) or "no experiments"
        raise ReportError(
            f"the tracking store {display_uri(uri)} holds no sparsebench cell runs "
            f"(searched: {which}); run `sparsebench run` first"
        )
    if experiment_names is None:  # report on the experiments that hold cells, not every one
        experiments = {k: v for k, v in experiments.items()
                       if any(r.info.experiment_id == k for r in found)}
    runs = pd.DataFrame([_run_row(r, experiments) for r in found])
    metric_keys = {r.info.run_id: sorted(r.data.metrics) for r in found}
    # Runs come newest first: keep the latest run of each cell id (untagged runs kept as they are).
    runs = runs[~(runs["cell_id"].ne("") & runs.duplicated(["experiment_id", "cell_id"]))]
    runs["seed"] = pd.to_numeric(runs["seed"], errors="coerce").astype("Int64")
    runs["settings"] = _settings(runs)
    runs = runs.sort_values(
        ["task", "variant", "estimator", "sweep", "settings", "seed"], ignore_index=True,
        key=lambda col: col.map(natural_key) if col.dtype == object else col,
    )
    cells = [_cell_frame(client, run, metric_keys[run["run_id"]]) for _, run in runs.iterrows()]
    frame = pd.concat(cells, ignore_index=True)
    frame["step"] = frame["step"].astype("Int64")
    front = ["experiment", "run_id", "run_name", *CELL_COLUMNS, "settings", "step", "primary", "select"]
    metrics = sorted(c for c in frame.columns if c not in front)
    return StoreData(uri, experiments, runs, frame[front + metrics])
