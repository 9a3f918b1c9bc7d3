"""What a figure plugin registers (``Figure``) and what its ``draw`` receives (``ReportContext``).

Kept free of heavy imports: plugin modules import this at start-up, so ``sparsebench --help``
must not pay for pandas or matplotlib here. ``draw`` functions import those themselves.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd
    from mlflow.tracking import MlflowClient

__all__ = ["Figure", "FigureEntry", "NoFigureData", "ReportContext", "ReportResult"]

_STEP_DIR = re.compile(r"^step=(\d+)$")


class NoFigureData(Exception):
    """Raised by ``Figure.draw`` when the store has runs of the task but not what the figure needs
    (no finished cell, no snapshot artifact yet). The report shows the message instead of a plot."""


@dataclass(frozen=True)
class ReportContext:
    """The store as read for one report; figure ``draw`` functions read only this."""

    frame: pd.DataFrame  # tidy: a row per cell per evaluation step (see reports.frame)
    runs: pd.DataFrame  # a row per cell run: tags, params ("params.<key>"), summary metrics
    client: MlflowClient  # for artifacts (snapshots) of the cell runs
    out_dir: Path  # where draw writes its PNG + SVG (and tables), logged with the report
    download_dir: Path  # scratch space for downloaded artifacts, not part of the report

    def snapshots(self, run_id: str, filename: str) -> dict[int, Path]:
        """Local copies of ``snapshots/step=<n>/<filename>`` of a run, by step (ascending).

        Empty when the run logged no such snapshot, so figures can tolerate cells that predate
        (or never write) an artifact.
        """
        found: dict[int, Path] = {}
        for info in self.client.list_artifacts(run_id, "snapshots"):
            match = _STEP_DIR.match(Path(info.path).name)
            if not (info.is_dir and match):
                continue
            names = {Path(f.path).name for f in self.client.list_artifacts(run_id, info.path)}
            if filename in names:
                dst = self.download_dir / run_id / info.path
                dst.mkdir(parents=True, exist_ok=True)
                local = self.client.download_artifacts(run_id, f"{info.path}/{filename}", str(dst))
                found[int(match.group(1))] = Path(local)
        return dict(sorted(found.items()))


@dataclass(frozen=True)
class Figure:
    """One report item of a task: usually a paper figure, possibly a paper table.

    ``draw`` writes its files (PNG + SVG for plots; CSV + HTML for tables) into ``ctx.out_dir``
    and returns their paths; it raises ``NoFigureData`` when the runs lack what it needs. It is
    only called when the store holds runs of ``task``; otherwise the report says "no runs yet".
    """

    name: str  # file stem and anchor, e.g. "fig2_identity"
    task: str  # e.g. "identity"
    title: str  # e.g. "Fig. 2: identity, test MSE against iterations"
    paper_note: str  # how the paper's figure looks / its numbers, shown beside ours
    draw: Callable[[ReportContext], list[Path]]


@dataclass(frozen=True)
class FigureEntry:
    """What became of one registered figure in a report."""

    figure: Figure
    status: str  # "drawn", "no runs yet", "no data" or "failed"
    message: str = ""  # why it was not drawn
    paths: tuple[Path, ...] = ()


@dataclass(frozen=True)
class ReportResult:
    """Where a report's files are and which MLflow run holds them."""

    out_dir: Path
    index_html: Path
    csv: Path  # the tidy frame
    parquet: Path
    tables: Mapping[str, Path]  # "matrix_summary.csv", "matrix_summary.html", ... by file name
    figures: Mapping[str, FigureEntry] = field(default_factory=dict)  # by figure name
    run_id: str = ""  # the report run (tag sparsebench.role = "report")
    experiment_id: str = ""
    documents: tuple[Path, ...] = ()  # copied beside the page: docs/protocols.md

    @property
    def figure_paths(self) -> list[Path]:
        """Every file the figures wrote, in registration order."""
        return [p for entry in self.figures.values() for p in entry.paths]
