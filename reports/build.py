"""``build_report``: the store -> tidy frame (CSV, Parquet) -> figures and tables -> ``index.html``,
all logged as one MLflow run (run name "report", tag ``sparsebench.role = "report"``) so the
dashboard shows the report beside the runs it summarises.

Imported only by the ``report`` command: it pulls in pandas, seaborn and MLflow.
"""

from __future__ import annotations

import logging
import platform
import shutil
import tempfile
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

from reports import schema
from reports.figure import Figure, FigureEntry, NoFigureData, ReportContext, ReportResult
from reports.frame import StoreData, display_uri, natural_key, read_store
from reports.html import PresetProtocol, Protocols, Provenance, Scores, render_index
from reports.protocols import DOCUMENT, departures, deviations, load, logged_value
from reports.scores import (
    MEASURES,
    draw_profile,
    performance_profile,
    performance_ratios,
    profile_taus,
    score_table,
)
from reports.tables import EMBEDDED_PREFIX, draw_heatmap, matrix_summary, write_table

__all__ = ["REPORT_RUN_NAME", "REPORTS_EXPERIMENT", "build_report"]

log = logging.getLogger(__name__)

REPORT_RUN_NAME = "report"
#: Where the report run goes when a report spans several experiments (else: that experiment).
REPORTS_EXPERIMENT = "sparsebench-reports"
_RUN_VERSION_TAGS = ("torch", "cuda", "python", "git_sha")
_EXPERIMENT_PREFIX = "sparsebench-"
_REPORT_PACKAGES = ("sparsebench", "mlflow", "pandas", "seaborn", "matplotlib")
#: The profile's values in its table (the figure draws a fine grid).
PROFILE_TABLE_TAUS = (1.0, 1.1, 1.5, 2.0, 4.0, 10.0, 100.0)


def build_report(
    tracking_uri: str,
    experiment_names: Sequence[str] | None,
    out_dir: Path,
    figures: Sequence[Figure],
) -> ReportResult:
    """Read the store's cell runs (all experiments if ``experiment_names`` is ``None``), write the
    report into ``out_dir`` and log it as a report run.

    Raises ``reports.errors.ReportError`` naming the store when it is absent or holds no cells.
    A figure whose task has no runs gets a "no runs yet" entry; one whose ``draw`` raises
    ``NoFigureData`` or fails gets its message; the report is written either way.
    """
    store = read_store(tracking_uri, experiment_names)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = _report_experiment(client, store)
    run = client.create_run(
        experiment_id, run_name=REPORT_RUN_NAME, tags=_report_tags(store, len(figures))
    )
    run_id = run.info.run_id
    try:
        result = _write(store, client, out_dir, figures, run_id, experiment_id)
        for path in (result.index_html, result.csv, result.parquet,
                     *result.tables.values(), *result.figure_paths, *result.documents):
            client.log_artifact(run_id, str(path))
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return result


def _report_experiment(client: MlflowClient, store: StoreData) -> str:
    if len(store.experiments) == 1:
        return next(iter(store.experiments))
    found = client.get_experiment_by_name(REPORTS_EXPERIMENT)
    if found is not None:
        return found.experiment_id
    # Artifacts beside a sqlite store, as for the cell experiments; MLflow's default would be
    # ./mlruns under whatever directory the report happens to run in.
    location = None
    if store.uri.startswith("sqlite:///"):
        db = Path(store.uri.removeprefix("sqlite:///").split("?", 1)[0])
        location = (db.resolve().parent / "artifacts" / REPORTS_EXPERIMENT).as_uri()
    return client.create_experiment(
        REPORTS_EXPERIMENT, artifact_location=location,
        tags={"mlflow.experimentKind": "custom_model_development"},
    )


def _report_tags(store: StoreData, n_figures: int) -> dict[str, str]:
    names = ", ".join(store.experiments.values())
    return {
        schema.ROLE_TAG: schema.REPORT,
        schema.REPORT_EXPERIMENTS_TAG: names,
        schema.REPORT_CELLS_TAG: str(len(store.runs)),
        "mlflow.note.content": (
            f"sparsebench report of {len(store.runs)} cells from {names}, {n_figures} figures. "
            "Open `index.html` under Artifacts."
        ),
    }


def _draw(figure: Figure, ctx: ReportContext, tasks: set[str]) -> FigureEntry:
    if figure.task not in tasks:
        return FigureEntry(figure, "no runs yet", f"the store has no {figure.task} runs yet")
    try:
        paths = tuple(figure.draw(ctx))
    except NoFigureData as e:
        return FigureEntry(figure, "no data", str(e))
    except Exception as e:  # one broken figure must not sink the report; the page says why
        log.exception("figure %s failed", figure.name)
        return FigureEntry(figure, "failed", f"{type(e).__name__}: {e}")
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        return FigureEntry(figure, "failed", f"draw returned missing files: {', '.join(missing)}")
    return FigureEntry(figure, "drawn", "", paths)


def _counts(values: pd.Series) -> list[tuple[str, int]]:
    return [(str(v), int(n)) for v, n in values.value_counts().items()]


def _provenance(store: StoreData, run_id: str) -> Provenance:
    runs = store.runs
    run_versions = {}
    for key in _RUN_VERSION_TAGS:
        column = f"tags.sparsebench.{key}"
        values = runs[column].dropna().unique() if column in runs else []
        run_versions[key] = sorted(str(v) for v in values)
    report_versions = {"python": platform.python_version()}
    for package in _REPORT_PACKAGES:
        try:
            report_versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            report_versions[package] = "not installed"
    return Provenance(
        store=display_uri(store.uri),
        experiments=list(store.experiments.values()),
        report_run=run_id,
        generated=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        cells_by_status=_counts(runs["status"]),
        data_sources=_counts(runs["data_source"]),
        devices=_counts(runs["device"]),
        run_versions=run_versions,
        report_versions=report_versions,
        embedded_data=bool(runs["data_source"].str.startswith(EMBEDDED_PREFIX).any()),
    )


def _cells(runs: pd.DataFrame) -> list[dict[str, object]]:
    """The runnable cells of ``runs`` as ``reports.protocols`` reads them, params parsed back."""
    cells = []
    for _, run in runs[runs["status"].ne(schema.NA)].iterrows():
        cell: dict[str, object] = {"name": run["run_name"], "task": run["task"],
                                   "estimator": run["estimator"], "seed": run["seed"]}
        for column, value in run.items():
            if str(column).startswith(("params.task.", "params.estimator.")) and pd.notna(value):
                cell[str(column).removeprefix("params.")] = logged_value(str(value))
        cells.append(cell)
    return cells


def _protocols(store: StoreData, out_dir: Path) -> Protocols:
    """Each reported preset against ``docs/protocols.md``, which is copied beside the page."""
    if not DOCUMENT.is_file():
        return Protocols(None, [])
    rows = load(DOCUMENT)
    document = Path(shutil.copyfile(DOCUMENT, out_dir / DOCUMENT.name))
    presets = []
    for experiment_id, name in store.experiments.items():
        preset = name.removeprefix(_EXPERIMENT_PREFIX)
        cells = _cells(store.runs[store.runs["experiment_id"].eq(experiment_id)])
        presets.append(PresetProtocol(
            preset, sum(r.preset == preset for r in rows), deviations(rows, [preset]),
            departures(rows, preset, cells),
        ))
    return Protocols(document, presets)


def _write(
    store: StoreData,
    client: MlflowClient,
    out_dir: Path,
    figures: Sequence[Figure],
    run_id: str,
    experiment_id: str,
) -> ReportResult:
    csv, parquet = out_dir / "frame.csv", out_dir / "frame.parquet"
    store.frame.to_csv(csv, index=False)
    store.frame.to_parquet(parquet, index=False)
    summary = matrix_summary(store.runs)
    tables = {p.name: p for p in write_table(summary, out_dir, "matrix_summary", "Matrix summary")}
    heatmap = draw_heatmap(summary, out_dir)
    tables.update({p.name: p for p in heatmap})
    scores = _scores(store, out_dir)
    tables.update({p.name: p for p in (*scores.tables, *scores.figure)})
    tasks = set(store.runs["task"])
    with tempfile.TemporaryDirectory(prefix="sparsebench-report-") as scratch:
        ctx = ReportContext(store.frame, store.runs, client, out_dir, Path(scratch))
        # the paper's order (Fig. 2 .. Fig. 7, then tables), whatever order plugins loaded in
        ordered = sorted(figures, key=lambda f: natural_key(f.title))
        entries = {f.name: _draw(f, ctx, tasks) for f in ordered}
    protocols = _protocols(store, out_dir)
    files = [csv, parquet, *tables.values(), *(p for e in entries.values() for p in e.paths)]
    if protocols.document is not None:
        files.append(protocols.document)
    index = render_index(
        out_dir, _provenance(store, run_id), summary, heatmap[0], list(entries.values()), files,
        protocols, scores,
    )
    return ReportResult(
        out_dir=out_dir, index_html=index, csv=csv, parquet=parquet, tables=tables,
        figures=entries, run_id=run_id, experiment_id=experiment_id,
        documents=(protocols.document,) if protocols.document else (),
    )


def _scores(store: StoreData, out_dir: Path) -> Scores:
    """``scores.csv`` (the validation-selected configuration per entry, its test metric with a 95%
    t interval, steps and time to target), the performance profiles on each measure
    (``performance_profile.csv`` and ``.png``/``.svg``) and the ratios behind them
    (``performance_ratios.csv``)."""
    table = score_table(store.runs)
    paths = write_table(table, out_dir, "scores", "Scores: the validation-selected configuration")
    ratios = {m: performance_ratios(table, m) for m in MEASURES}
    ratios = {m: r for m, r in ratios.items() if len(r)}  # no variant with a target: no steps profile
    if not ratios:
        return Scores(table, tuple(paths), (), pd.DataFrame())
    profiles = {m: performance_profile(r, profile_taus(r)) for m, r in ratios.items()}
    at = pd.concat([performance_profile(r, list(PROFILE_TABLE_TAUS)).assign(measure=MEASURES[m][0])
                    for m, r in ratios.items()], ignore_index=True)
    at = at[["measure", *(c for c in at.columns if c != "measure")]]
    paths += write_table(at, out_dir, "performance_profile", "Performance profile")
    long = pd.concat([r.assign(measure=MEASURES[m][0]).rename_axis("variant").reset_index()
                      for m, r in ratios.items()], ignore_index=True)
    paths += write_table(long, out_dir, "performance_ratios", "Performance ratios")
    return Scores(table, tuple(paths), tuple(draw_profile(profiles, ratios, out_dir)), at)
