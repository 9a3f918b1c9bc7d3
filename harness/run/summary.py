"""Rich tables for the terminal: plugins, cells, results, and where to look next."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from harness.matrix import Cell
from harness.plugins import Registry
from harness.run.cell import CellResult, Outcome
from harness.store.dashboard import experiment_url, ui_url

__all__ = ["print_cells", "print_params", "print_plugins", "print_registry", "print_results", "print_where"]

STATUS_STYLE: dict[Outcome, str] = {
    "finished": "green",
    "skipped": "dim",
    "n/a": "yellow",
    "diverged": "magenta",
    "failed": "red",
    "killed": "red",
    "elsewhere": "cyan",  # claimed by another process on the same store
    "superseded": "red",
}


def print_plugins(console: Console, registry: Registry) -> None:
    table = Table(title="plugins")
    for col in ("plugin", "source", "code", "registered"):
        table.add_column(col)
    for name, source in registry.plugins.items():
        table.add_row(name, source, registry.version(name), ", ".join(registry.provided_by(name)) or "-")
    for name, source in registry.disabled.items():
        table.add_row(f"[dim]{name}[/]", f"[dim]{source}[/]", "", "[yellow]switched off[/]")
    console.print(table)


def print_registry(console: Console, registry: Registry) -> None:
    table = Table(title="tasks and estimators")
    for col in ("type", "name", "kinds", "plugin", "description"):
        table.add_column(col)
    for name, reg in registry.tasks.items():
        table.add_row("task", name, ", ".join(reg.obj.kinds), reg.plugin, reg.obj.description)
    for name, reg in registry.estimators.items():
        table.add_row("estimator", name, ", ".join(sorted(reg.obj.kinds)), reg.plugin, reg.obj.description)
    console.print(table)


def print_cells(console: Console, cells: Sequence[Cell]) -> None:
    table = Table(title=f"{len(cells)} cells")
    for col in ("cell", "id", "kind", "steps"):
        table.add_column(col)
    for cell in cells:
        kind = cell.kind or f"[yellow]n/a: {cell.na_reason}[/]"
        table.add_row(cell.name, cell.cell_id, kind, str(cell.task_params.get("steps", "")))
    console.print(table)


def _settings(params: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in params.items())


def print_params(console: Console, cells: Sequence[Cell]) -> None:
    """Each cell's resolved task and estimator parameters and, for a tuning trial, its values:
    what the cell will run with, before it runs (``list --params``, ``run --dry-run --params``).
    Plain lines, one block per cell, never wrapped: long parameter lists stay greppable."""
    console.print(f"[bold]{len(cells)} cells: resolved parameters[/]")
    for cell in cells:
        lines = [f"{cell.name}  {cell.cell_id}"]
        if cell.trial is not None:
            values = {k.partition(".")[2]: v for k, v in cell.trial_values.items()}
            lines.append(f"  trial      {cell.trial}: {_settings(values)}")
        if cell.na_reason is not None:
            lines.append(f"  n/a        {cell.na_reason}")
        lines.append(f"  task       {_settings(cell.task_params)}")
        lines.append(f"  estimator  {_settings(cell.estimator_params)}")
        console.print("\n".join(lines), markup=False, highlight=False, soft_wrap=True)


def print_results(console: Console, results: Sequence[CellResult]) -> None:
    table = Table(title="summary")
    for col in ("cell", "status", "metric", "wall s", "note"):
        table.add_column(col)
    for r in results:
        style = STATUS_STYLE.get(r.status, "")
        metric = "" if r.metric is None else f"{r.metric:.4g}"
        wall = f"{r.wall_s:.1f}" if r.wall_s else ""
        table.add_row(r.cell.name, f"[{style}]{r.status}[/]", metric, wall, r.reason[:80])
    console.print(table)
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    console.print(", ".join(f"{n} {s}" for s, n in sorted(counts.items())))


def print_where(console: Console, uri: str, experiment_id: str) -> None:
    console.print(f"store: [bold]{uri}[/]")
    if uri.startswith(("http://", "https://")):  # a tracking server is a dashboard too
        console.print("dashboard: open")
        url = experiment_url(uri, experiment_id)
    else:
        console.print(f"dashboard: [bold]sparsebench ui --tracking-uri {uri}[/] then open")
        url = ui_url(5000, experiment_id)
    console.print(url, soft_wrap=True)  # one line, so that a terminal can open it
    console.print("report: [bold]sparsebench report[/]")
