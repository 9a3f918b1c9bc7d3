"""The in-process backend: claim each cell, open or adopt its run, execute it here, in order.

What a backend decides is only *where* a claimed cell runs. Claims (``harness.claims``), the
heartbeat (``harness.lease``), checkpoints (``harness.checkpoint``) and the cell's life
(``harness.cell.execute``) are shared machinery, so several ``sparsebench run`` processes on one
store share the matrix out between them and each cell runs exactly once. An interruption
(Ctrl-C, SIGTERM, SIGHUP) checkpoints the current cell, marks it and the parent run KILLED and
propagates; the next ``sparsebench run`` resumes every cell that did not finish.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from harness import claims
from harness.cell import CellJob, CellResult, execute
from harness.checkpoint import CheckpointPolicy, checkpoints_for
from harness.claims import STATUS_TAG, Decision, Owner
from harness.errors import UsageError
from harness.lease import Heartbeat
from harness.matrix import Cell
from harness.plugins import Registry
from harness.signals import Interrupted, SignalGuard
from harness.tracking import Tracker, environment_tags

__all__ = ["CellProgress", "MatrixOptions", "open_cell_run", "pick_device", "run_matrix"]


def pick_device(choice: str) -> torch.device:
    """``auto`` takes CUDA when present; asking for CUDA without one is a usage error."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    if choice not in ("cpu", "cuda"):
        raise UsageError(f"--device {choice!r}: choose auto, cpu or cuda")
    return torch.device(choice)


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

    def start(self, name: str, steps: int, completed: int = 0) -> None:
        if self.cell is not None:
            self.progress.remove_task(self.cell)
        self.cell = self.progress.add_task(name, total=steps, completed=completed, rate="", loss="")
        self._t0, self._n = time.perf_counter(), 0

    def advance(self, loss: float) -> None:
        self._n += 1
        rate = self._n / max(time.perf_counter() - self._t0, 1e-9)
        self.progress.update(self.cell, advance=1, rate=f"{rate:.1f} it/s", loss=f"loss {loss:.4g}")

    def cell_done(self) -> None:
        self.progress.advance(self.matrix)


@dataclass(frozen=True)
class MatrixOptions:
    """How a launcher runs its matrix; plain data."""

    device: torch.device
    cache_dir: Path
    checkpoints: CheckpointPolicy
    force: bool = False
    retry: tuple[str, ...] = ()  # statuses of finished cells to run again (diverged, n/a)
    stale_s: float = claims.DEFAULT_STALE_S
    show_progress: bool = True
    plugins: tuple[str, ...] = ()


def open_cell_run(
    tracker: Tracker,
    decision: Decision,
    experiment_id: str,
    parent_id: str,
    cell: Cell,
    env_tags: dict[str, str],
    checkpoints: CheckpointPolicy,
) -> tuple[str, bool]:
    """The run a claimed cell writes to: its unfinished run adopted, or a new one; (run id, resumed)."""
    assert decision.claim is not None
    if decision.action == "resume" and decision.run is not None:
        return tracker.adopt_cell(decision.run, parent_id, env_tags, decision.claim), True
    if decision.run is not None and decision.run.info.status != "FINISHED":
        # an earlier run that will not be resumed (failed, or other code): its checkpoint is stale
        checkpoints_for(checkpoints, tracker.client, tracker.uri).prune(decision.run.info.run_id)
    return tracker.start_cell(experiment_id, parent_id, cell, env_tags, decision.claim), False


def run_matrix(
    cells: Sequence[Cell],
    registry: Registry,
    tracker: Tracker,
    preset: str,
    options: MatrixOptions,
    guard: SignalGuard | None = None,
    notify: Callable[[str], None] = print,
) -> list[CellResult]:
    """Every cell in order under one parent run; cells finished or running elsewhere are left."""
    guard = guard or SignalGuard()
    experiment_id = tracker.experiment(preset)
    done = set() if options.force else tracker.finished_cells(experiment_id, options.retry)
    todo = [c for c in cells if c.cell_id not in done]
    results = [CellResult(c, "skipped", reason="finished earlier") for c in cells if c.cell_id in done]
    if not todo:
        return results
    owner = Owner.me()
    env_tags = environment_tags(str(options.device))
    progress = CellProgress(len(todo)) if options.show_progress else None
    parent: str | None = None
    status = "finished"
    try:
        with guard.atomic():
            parent = tracker.start_parent(experiment_id, preset, len(todo), owner)
        with Heartbeat(tracker.client) as heartbeat, progress or contextlib.nullcontext():
            heartbeat.hold(parent)
            for cell in todo:
                results.append(
                    _claim_and_execute(
                        cell,
                        registry,
                        tracker,
                        experiment_id,
                        parent,
                        env_tags,
                        options,
                        guard,
                        heartbeat,
                        progress,
                        notify,
                    )
                )
                if progress:
                    progress.cell_done()
            guard.raise_pending()  # a signal during the last claim
    except KeyboardInterrupt:
        status = "killed"
        raise
    except BaseException:
        status = "failed"
        raise
    finally:
        if parent is not None:
            if status == "finished" and any(r.status == "failed" for r in results):
                status = "failed"
            with guard.deferred():
                tracker.set_tags(parent, {STATUS_TAG: status})
                tracker.end(parent, {"finished": "FINISHED", "killed": "KILLED"}.get(status, "FAILED"))
    return results


def _claim_and_execute(
    cell: Cell,
    registry: Registry,
    tracker: Tracker,
    experiment_id: str,
    parent: str,
    env_tags: dict[str, str],
    options: MatrixOptions,
    guard: SignalGuard,
    heartbeat: Heartbeat,
    progress: CellProgress | None,
    notify: Callable[[str], None],
) -> CellResult:
    guard.raise_pending()
    with guard.deferred():  # a claim and its run are made together or not at all
        decision = claims.acquire(
            tracker.client,
            experiment_id,
            cell.cell_id,
            force=options.force,
            retry=options.retry,
            env_tags=env_tags,
            stale_s=options.stale_s,
            artifact_root=tracker.artifact_root,
        )
        if decision.action == "skip":  # nothing written: a signal acts at the next cell
            return CellResult(cell, "skipped", reason=decision.reason, run_id=decision.run.info.run_id)
        if decision.action == "busy":
            return CellResult(cell, "elsewhere", reason=decision.reason)
        if decision.reason:
            notify(f"cell {cell.name}: {decision.reason}; starting it afresh in a new run")
        run_id, resumed = open_cell_run(
            tracker, decision, experiment_id, parent, cell, env_tags, options.checkpoints
        )
    if guard.pending is not None:  # interrupted while claiming: leave the run for the next launcher
        with guard.deferred():
            tracker.set_tags(run_id, {STATUS_TAG: "killed"})
            tracker.end(run_id, "KILLED")
        raise Interrupted(guard.pending, f"{cell.name} was claimed but not started")
    job = CellJob(
        cell=cell,
        tracking_uri=tracker.uri,
        run_id=run_id,
        claim=decision.claim,
        device=str(options.device),
        cache_dir=str(options.cache_dir),
        checkpoints=options.checkpoints,
        resume=resumed,
        plugins=options.plugins,
    )
    return execute(
        job, registry=registry, tracker=tracker, guard=guard, heartbeat=heartbeat, progress=progress
    )
