"""The order parallel backends start cells in: longest expected first.

With several workers, a matrix ends when its last cell does; starting the long cells first keeps
one long straggler from running alone at the end (the classic longest-processing-time rule). A
cell's expected time is what the same cell (any seed, same number of steps) took when it last
finished in the store, else its task's own figure, ``Task.expected_seconds(params)`` (steps x a
per-step cost). Only the order depends on it; n/a cells (instant) go first.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import TYPE_CHECKING

from harness.matrix import Cell
from harness.plugins import Registry
from reports.schema import CELLS_FILTER

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

__all__ = ["expected_seconds", "longest_first", "measured_seconds"]


def _family(name: str, steps: object) -> tuple[str, str]:
    """A cell's name without its seed, and its steps: cells that should take as long."""
    return "/".join(p for p in name.split("/") if not p.startswith("seed=")), str(steps)


def measured_seconds(client: MlflowClient, experiment_id: str) -> dict[tuple[str, str], float]:
    """Median training time of finished cells in the store, by (name without seed, steps)."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"{CELLS_FILTER} and attributes.status = 'FINISHED'",
        max_results=5000,
    )
    walls: dict[tuple[str, str], list[float]] = {}
    for run in runs:
        wall = run.data.metrics.get("summary/wall_s")
        name = run.data.tags.get("mlflow.runName", "")
        if wall and name:
            walls.setdefault(_family(name, run.data.params.get("task.steps")), []).append(wall)
    return {key: statistics.median(values) for key, values in walls.items()}


def expected_seconds(cell: Cell, registry: Registry, measured: dict[tuple[str, str], float]) -> float:
    if cell.na_reason is not None:
        return 0.0
    seen = measured.get(_family(cell.name, cell.task_params.get("steps")))
    if seen is not None:
        return seen
    return float(registry.task(cell.task).expected_seconds(cell.task_params))


def longest_first(
    cells: Sequence[Cell], registry: Registry, measured: dict[tuple[str, str], float]
) -> list[Cell]:
    """n/a cells, then the rest by expected time, longest first (ties keep the matrix order)."""
    return sorted(cells, key=lambda c: (c.na_reason is None, -expected_seconds(c, registry, measured)))
