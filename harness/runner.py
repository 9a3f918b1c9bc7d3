"""The launcher: claim each cell, open or adopt its run, hand it to a backend, record how it ended.

What a backend (``harness.backend``) decides is only *where* a claimed cell runs: this process,
a local worker process, a Ray task. Claims (``harness.claims``), the heartbeat
(``harness.lease``), checkpoints (``harness.checkpoint``) and the cell's life
(``harness.cell.execute``) are shared machinery, so several ``sparsebench run`` processes on one
store share the matrix out between them and each cell runs exactly once, on any backend.

The launcher owns the experiment, the parent run and the claims; workers own their cell runs.
With workers in other processes on a sqlite store, the launcher serves the store through an
MLflow server on 127.0.0.1 for the run (``harness.server``). A worker that dies ends its cell as
failed with the reason, resumable; the matrix goes on. An interruption (Ctrl-C, SIGTERM, SIGHUP)
asks every running cell to checkpoint and end KILLED (a second one stops them at once), marks the
parent run KILLED and propagates; the next ``sparsebench run`` resumes every cell that did not
finish.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from harness import claims, schedule
from harness.backend import Backend, Event, LocalBackend
from harness.cell import CellJob, CellResult
from harness.checkpoint import CheckpointPolicy, checkpoints_for
from harness.claims import LOST_TAG, STATUS_TAG, TERMINAL, Decision, Owner
from harness.errors import UsageError
from harness.faults import StoreLost, store_fault
from harness.lease import Heartbeat
from harness.matrix import Cell
from harness.plugins import Registry
from harness.progress import MatrixView, make_view
from harness.server import TrackingServer
from harness.signals import Interrupted, SignalGuard
from harness.store import sqlite_path
from harness.tracking import Tracker, environment_tags

__all__ = ["MatrixOptions", "open_cell_run", "pick_device", "run_matrix"]

POLL_S = 0.5  # how long the launcher waits on its workers between looks at its own signals


def pick_device(choice: str) -> torch.device:
    """``auto`` takes CUDA when present; asking for CUDA without one is a usage error."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    if choice not in ("cpu", "cuda"):
        raise UsageError(f"--device {choice!r}: choose auto, cpu or cuda")
    return torch.device(choice)


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
    backend: Backend | None = None,
) -> list[CellResult]:
    """Every cell under one parent run, on ``backend`` (default: in this process, in order);
    cells finished or running elsewhere are left. Parallel backends start the longest first."""
    guard = guard or SignalGuard()
    experiment_id = tracker.experiment(preset)
    done = set() if options.force else tracker.finished_cells(experiment_id, options.retry)
    todo = [c for c in cells if c.cell_id not in done]
    results = [CellResult(c, "skipped", reason="finished earlier") for c in cells if c.cell_id in done]
    if not todo:
        return results
    if backend is not None and backend.slots > 1:
        measured = schedule.measured_seconds(tracker.client, experiment_id)
        todo = schedule.longest_first(todo, registry, measured)
    with contextlib.ExitStack() as stack:
        db = sqlite_path(tracker.uri)
        if backend is not None and backend.remote and db is not None:
            assert tracker.artifact_root is not None
            log = db.resolve().parent / "mlflow-server.log"
            server = stack.enter_context(TrackingServer(tracker.uri, tracker.artifact_root, log))
            tracker = Tracker(server.uri, artifact_root=tracker.artifact_root)
        launch = _Launch(registry, tracker, experiment_id, options, guard, notify)
        results += launch.run(todo, preset, backend)
    return results


class _Launch:
    """One ``run_matrix`` call's state: the parent run, the cells in flight, their results."""

    def __init__(
        self,
        registry: Registry,
        tracker: Tracker,
        experiment_id: str,
        options: MatrixOptions,
        guard: SignalGuard,
        notify: Callable[[str], None],
    ) -> None:
        self.registry, self.tracker, self.experiment_id = registry, tracker, experiment_id
        self.options, self.guard, self.notify = options, guard, notify
        self.owner = Owner.me()
        self.env_tags = environment_tags(str(options.device))
        self.in_flight: dict[str, CellJob] = {}
        self.results: list[CellResult] = []
        self.usage_error = ""
        self.store_lost: StoreLost | None = None
        self.stopping = False

    def run(self, todo: list[Cell], preset: str, backend: Backend | None) -> list[CellResult]:
        tracker, guard = self.tracker, self.guard
        self.view: MatrixView = make_view(len(todo), self.options.show_progress)
        parent: str | None = None
        status = "finished"
        try:
            with guard.atomic():
                parent = tracker.start_parent(self.experiment_id, preset, len(todo), self.owner)
            with Heartbeat(tracker.client) as heartbeat, self.view:
                self.heartbeat, self.parent = heartbeat, parent
                heartbeat.hold(parent)
                self.backend = backend or LocalBackend(self.registry, tracker, guard, heartbeat)
                try:
                    self._loop(list(todo))
                except KeyboardInterrupt as e:
                    raise Interrupted(*self._stop(e)) from None
            if self.store_lost is not None:
                raise self.store_lost
            if self.usage_error:
                raise UsageError(self.usage_error)
        except KeyboardInterrupt:
            status = "killed"
            raise
        except BaseException as e:
            status = "killed" if isinstance(e, Exception) and store_fault(e) else "failed"
            raise
        finally:
            if parent is not None:
                if status == "finished" and any(r.status == "failed" for r in self.results):
                    status = "failed"
                with guard.deferred():
                    self._end_parent(parent, status)
        return self.results

    def _end_parent(self, parent: str, status: str) -> None:
        """The parent run's final status; a store that fails here is already being reported."""
        try:
            self.tracker.set_tags(parent, {STATUS_TAG: status})
            self.tracker.end(parent, {"finished": "FINISHED", "killed": "KILLED"}.get(status, "FAILED"))
        except Exception as e:
            if store_fault(e) is None:
                raise

    def _loop(self, pending: list[Cell]) -> None:
        backend = self.backend
        while pending or backend.busy():
            self.guard.raise_pending()
            halted = self.usage_error or self.store_lost
            while pending and len(self.in_flight) < backend.slots and not halted:
                outcome = self._claim(pending.pop(0))
                if isinstance(outcome, CellResult):
                    self._ended(None, outcome)
                    continue
                self.in_flight[outcome.run_id] = outcome
                self.heartbeat.hold(outcome.run_id, outcome.claim)  # until its worker beats for it
                backend.submit(outcome)
            if self.usage_error or self.store_lost:
                pending.clear()  # bad input or a failed store: start nothing more, let the others end
            # Workers elsewhere: a signal waits for this poll to end (half a second), so that no
            # event is half delivered. In this process, the cell handles signals itself.
            with self.guard.deferred() if backend.remote else contextlib.nullcontext():
                backend.poll(POLL_S, self._deliver)
        self.guard.raise_pending()  # a signal during the last claim

    def _claim(self, cell: Cell) -> CellJob | CellResult:
        tracker, guard, options = self.tracker, self.guard, self.options
        guard.raise_pending()
        with guard.deferred():  # a claim and its run are made together or not at all
            decision = claims.acquire(
                tracker.client,
                self.experiment_id,
                cell.cell_id,
                force=options.force,
                retry=options.retry,
                env_tags=self.env_tags,
                stale_s=options.stale_s,
                artifact_root=tracker.artifact_root,
                owner=self.owner,
            )
            if decision.action == "skip":  # nothing written: a signal acts at the next cell
                return CellResult(cell, "skipped", reason=decision.reason, run_id=decision.run.info.run_id)
            if decision.action == "busy":
                return CellResult(cell, "elsewhere", reason=decision.reason)
            if decision.reason:
                self.notify(f"cell {cell.name}: {decision.reason}; starting it afresh in a new run")
            run_id, resumed = open_cell_run(
                tracker, decision, self.experiment_id, self.parent, cell, self.env_tags, options.checkpoints
            )
        if guard.pending is not None:  # interrupted while claiming: leave the run for the next launcher
            with guard.deferred():
                tracker.set_tags(run_id, {STATUS_TAG: "killed"})
                tracker.end(run_id, "KILLED")
            raise Interrupted(guard.pending, f"{cell.name} was claimed but not started")
        return CellJob(
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

    def _deliver(self, event: Event) -> None:
        view = self.view
        if event.kind == "start":
            view.started(event.key, event.name, event.steps, event.step)
        elif event.kind == "step":
            view.advanced(event.key, event.step, event.loss, event.elapsed)
        elif event.kind == "eval":
            view.evaluated(event.key, event.step, event.metrics, event.elapsed)
        elif event.kind == "done" and event.key in self.in_flight:
            assert event.result is not None
            if event.usage_error and not self.usage_error:
                self.usage_error = event.usage_error
            if event.store_lost is not None and self.store_lost is None:
                self.store_lost = event.store_lost
            self.in_flight.pop(event.key)
            self._ended(event.key, event.result)
        elif event.kind == "lost" and event.key in self.in_flight:
            job = self.in_flight.pop(event.key)
            with self.guard.deferred():
                result = self._lost(job, event.reason)
            self._ended(event.key, result)

    def _ended(self, key: str | None, result: CellResult) -> None:
        if key is not None:
            self.heartbeat.release(key)
        self.results.append(result)
        self.view.ended(key, result)

    def _lost(self, job: CellJob, reason: str) -> CellResult:
        """A cell whose worker is gone: failed with the reason, and resumable (``LOST_TAG``); or,
        while stopping, KILLED. A run its worker ended before dying keeps what it says."""
        run = self.tracker.client.get_run(job.run_id)
        if run.info.status in TERMINAL:
            status = run.data.tags.get(STATUS_TAG, run.info.status.lower())
            reason = run.data.tags.get("sparsebench.reason", "")
            return CellResult(job.cell, status, reason=reason, run_id=job.run_id)
        if self.stopping:
            self.tracker.set_tags(job.run_id, {STATUS_TAG: "killed"})
            self.tracker.end(job.run_id, "KILLED")
            return CellResult(job.cell, "killed", reason=f"stopped: {reason}", run_id=job.run_id)
        why = f"{reason}; `sparsebench run` resumes it"
        self.tracker.set_tags(job.run_id, {STATUS_TAG: "failed", "sparsebench.reason": why, LOST_TAG: "1"})
        self.tracker.end(job.run_id, "FAILED")
        return CellResult(job.cell, "failed", reason=why, run_id=job.run_id)

    def _stop(self, e: KeyboardInterrupt) -> tuple[int, str]:
        """After a signal in the launcher: every running cell checkpoints and ends KILLED (a
        second signal: at once); the signal and one note on what was saved."""
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        self.stopping = True
        backend = self.backend
        if backend.busy():
            self.notify(
                f"sparsebench: {signal.Signals(signum).name}: {len(self.in_flight)} running cells checkpoint "
                "at their next step (send it again to stop them at once)"
            )
            backend.interrupt(signum)
            try:
                while backend.busy():
                    backend.poll(POLL_S, self._deliver)
            except KeyboardInterrupt:
                backend.kill()
        killed = [r for r in self.results if r.status == "killed"]
        for job in list(self.in_flight.values()):  # not heard of since: stopped at once, or local
            self.in_flight.pop(job.run_id)
            run = self.tracker.client.get_run(job.run_id)
            if run.info.status == "RUNNING":
                self.tracker.set_tags(job.run_id, {STATUS_TAG: "killed"})
                self.tracker.end(job.run_id, "KILLED")
                killed.append(CellResult(job.cell, "killed", reason="stopped at once", run_id=job.run_id))
        if isinstance(e, Interrupted) and e.note:  # the in-process cell said where it stopped
            return signum, e.note
        notes = [r.reason or f"{r.cell.name} stopped" for r in killed]
        if len(notes) > 1:
            return signum, f"{len(notes)} cells stopped: " + "; ".join(notes)
        return signum, notes[0] if notes else ""
