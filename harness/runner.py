"""Runs cells: seed, build, train, evaluate, log; one cell's failure never sinks the matrix.

``run_cell`` is the whole life of one cell and depends only on the cell's resolved config, its seed
and the device, so a backend may run it anywhere. The in-process backend (``run_matrix``) runs
cells one after another; Ctrl-C marks the current cell and the parent run KILLED, and the next
``sparsebench run`` picks up every cell that did not finish.
"""

from __future__ import annotations

import contextlib
import math
import random
import resource
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from estimators.base import Unsupported
from harness.matrix import Cell
from harness.plugins import Registry
from harness.task import CellSetup, TaskRun
from harness.tracking import STATUS_TAG, Tracker, environment_tags

__all__ = ["CellResult", "pick_device", "run_cell", "run_matrix", "seed_everything"]

LOG_EVERY = 10  # training metrics every LOG_EVERY steps, sent in one batch at each evaluation


@dataclass
class CellResult:
    cell: Cell
    status: str  # finished | diverged | failed | killed | n/a | skipped
    metric: float | None = None
    wall_s: float = 0.0
    reason: str = ""
    run_id: str | None = None


class Diverged(Exception):
    """A non-finite loss or metric; the cell ends as ``diverged``."""


def pick_device(choice: str) -> torch.device:
    """``auto`` takes CUDA when present; asking for CUDA without one is a usage error."""
    from harness.errors import UsageError

    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    if choice not in ("cpu", "cuda"):
        raise UsageError(f"--device {choice!r}: choose auto, cpu or cuda")
    return torch.device(choice)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA generators too


def _finite(values: dict[str, float]) -> None:
    for key, value in values.items():
        if not math.isfinite(value):
            raise Diverged(f"{key} = {value} is not finite")


def _peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # CPU: the process high-water mark (ru_maxrss is KiB on Linux).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_cell(
    cell: Cell,
    registry: Registry,
    tracker: Tracker,
    run_id: str,
    device: torch.device,
    cache_dir: Path,
    progress: CellProgress | None = None,
) -> CellResult:
    """Train and evaluate one cell, logging to ``run_id``; returns how it ended."""
    task = registry.task(cell.task)
    estimator = registry.estimator(cell.estimator)
    seed_everything(cell.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    layer = estimator.build(cell.spec, cell.estimator_params)
    run: TaskRun = task.setup(CellSetup(cell.task_params, layer, cell.kind, device, cell.seed, cache_dir))
    tracker.set_tags(run_id, {**run.provenance, "sparsebench.primary_metric": task.primary_metric})
    model = run.model.to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=cell.task_params["lr"])
    pending: list[tuple[int, dict[str, float]]] = []
    start = time.perf_counter()
    last_eval: dict[str, float] = {}

    def evaluate(step: int) -> None:
        nonlocal last_eval
        model.eval()
        with torch.no_grad():
            metrics = run.evaluate()
        model.train()
        _finite(metrics)
        last_eval = metrics
        pending.append((step, {**metrics, "time/elapsed_s": time.perf_counter() - start}))
        tracker.log_metrics(run_id, pending)  # each evaluation makes the dashboard current
        pending.clear()

    def snapshot(step: int) -> None:
        if run.write_artifacts is None:
            return
        with tempfile.TemporaryDirectory() as tmp:
            run.write_artifacts(step, Path(tmp))
            tracker.log_dir(run_id, Path(tmp), f"snapshots/step={step}")

    if progress:
        progress.start(cell.name, run.steps)
    try:  # whatever ends the loop, the metrics logged so far reach the store
        _train(run, model, optimiser, evaluate, snapshot, pending, progress)
        wall = time.perf_counter() - start
        pending.append(
            (
                run.steps,
                {
                    "summary/wall_s": wall,
                    "summary/peak_mem_mb": _peak_mem_mb(device),
                    "summary/steps_per_s": run.steps / wall if wall > 0 else 0.0,
                },
            )
        )
    finally:
        tracker.log_metrics(run_id, pending)
    return CellResult(cell, "finished", last_eval.get(task.primary_metric), wall, run_id=run_id)


def _train(
    run: TaskRun,
    model: torch.nn.Module,
    optimiser: torch.optim.Optimizer,
    evaluate: Callable[[int], None],
    snapshot: Callable[[int], None],
    pending: list[tuple[int, dict[str, float]]],
    progress: CellProgress | None,
) -> None:
    model.train()
    evaluate(0)
    for step in range(run.steps):
        if step in run.snapshot_steps:
            snapshot(step)
        objective, metrics = run.train_step(step)
        loss = float(objective.detach())
        _finite({"train/objective": loss, **metrics})
        optimiser.zero_grad(set_to_none=True)
        objective.backward()
        optimiser.step()
        if step % LOG_EVERY == 0:
            pending.append((step, {"train/objective": loss, **metrics}))
        done = step + 1
        if done % run.eval_every == 0 or done == run.steps:
            evaluate(done)
        if progress:
            progress.advance(loss)
    if run.steps in run.snapshot_steps:
        snapshot(run.steps)


class CellProgress:
    """Rich progress: one bar for the matrix, one for the current cell (ETA, it/s, loss)."""

    def __init__(self, total_cells: int) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description}", style="bold"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[rate]}"),
            TextColumn("{task.fields[loss]}"),
        )
        self.matrix = self.progress.add_task("matrix", total=total_cells, rate="", loss="")
        self.cell: int | None = None
        self._t0 = 0.0
        self._n = 0

    def __enter__(self) -> CellProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def start(self, name: str, steps: int) -> None:
        if self.cell is not None:
            self.progress.remove_task(self.cell)
        self.cell = self.progress.add_task(name, total=steps, rate="", loss="")
        self._t0, self._n = time.perf_counter(), 0

    def advance(self, loss: float) -> None:
        self._n += 1
        rate = self._n / max(time.perf_counter() - self._t0, 1e-9)
        self.progress.update(self.cell, advance=1, rate=f"{rate:.1f} it/s", loss=f"loss {loss:.4g}")

    def cell_done(self) -> None:
        self.progress.advance(self.matrix)


def run_matrix(
    cells: Sequence[Cell],
    registry: Registry,
    tracker: Tracker,
    preset: str,
    device: torch.device,
    cache_dir: Path,
    force: bool = False,
    show_progress: bool = True,
    retry: Sequence[str] = (),
) -> list[CellResult]:
    """The in-process backend: every cell in order, under one parent run. Cells that finished
    earlier are skipped, unless ``force`` or their status is in ``retry`` (diverged, n/a)."""
    experiment_id = tracker.experiment(preset)
    done = set() if force else tracker.finished_cells(experiment_id, retry)
    todo = [c for c in cells if c.cell_id not in done]
    results = [CellResult(c, "skipped", reason="finished earlier") for c in cells if c.cell_id in done]
    if not todo:
        return results
    parent = tracker.start_parent(experiment_id, preset, len(todo))
    env_tags = environment_tags(str(device))
    progress = CellProgress(len(todo)) if show_progress else None
    try:
        with progress or contextlib.nullcontext():
            for cell in todo:
                results.append(
                    _run_one(
                        cell, registry, tracker, experiment_id, parent, env_tags, device, cache_dir, progress
                    )
                )
                if progress:
                    progress.cell_done()
    except KeyboardInterrupt:
        tracker.end(parent, "KILLED")
        raise
    failed = any(r.status == "failed" for r in results)
    tracker.set_tags(parent, {STATUS_TAG: "failed" if failed else "finished"})
    tracker.end(parent, "FINISHED")
    return results


def _run_one(
    cell: Cell,
    registry: Registry,
    tracker: Tracker,
    experiment_id: str,
    parent: str,
    env_tags: dict[str, str],
    device: torch.device,
    cache_dir: Path,
    progress: CellProgress | None,
) -> CellResult:
    run_id = tracker.start_cell(experiment_id, parent, cell, env_tags)
    if cell.na_reason is not None:
        tracker.set_tags(run_id, {STATUS_TAG: "n/a", "sparsebench.reason": cell.na_reason})
        tracker.end(run_id, "FINISHED")
        return CellResult(cell, "n/a", reason=cell.na_reason, run_id=run_id)
    try:
        result = run_cell(cell, registry, tracker, run_id, device, cache_dir, progress)
    except KeyboardInterrupt:
        tracker.set_tags(run_id, {STATUS_TAG: "killed"})
        tracker.end(run_id, "KILLED")
        raise
    except Unsupported as e:  # build() or the task found it cannot serve the cell after all
        reason = str(e) or "the estimator raised Unsupported"
        tracker.set_tags(run_id, {STATUS_TAG: "n/a", "sparsebench.reason": reason})
        tracker.end(run_id, "FINISHED")
        return CellResult(cell, "n/a", reason=reason, run_id=run_id)
    except Diverged as e:
        tracker.set_tags(run_id, {STATUS_TAG: "diverged", "sparsebench.reason": str(e)})
        tracker.end(run_id, "FINISHED")  # a diverged cell is a result, not an error to retry
        return CellResult(cell, "diverged", reason=str(e), run_id=run_id)
    except Exception as e:
        tracker.log_text(run_id, "traceback.txt", traceback.format_exc())
        reason = f"{type(e).__name__}: {e}"
        tracker.set_tags(run_id, {STATUS_TAG: "failed", "sparsebench.reason": reason})
        tracker.end(run_id, "FAILED")
        print(f"cell {cell.name} failed: {reason}", file=sys.stderr)
        return CellResult(cell, "failed", reason=reason, run_id=run_id)
    tracker.set_tags(run_id, {STATUS_TAG: "finished"})
    tracker.end(run_id, "FINISHED")
    return result
