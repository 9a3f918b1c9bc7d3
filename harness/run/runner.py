"""The launcher: claim each cell, open or adopt its run, hand it to a backend, record how it ended.

What a backend (``harness.backends.base``) decides is only *where* a claimed cell runs: this process,
a local worker process, a Ray task. Claims (``harness.store.claims``), the heartbeat
(``harness.store.lease``), checkpoints (``harness.store.checkpoint``) and the cell's life
(``harness.run.cell.execute``) are shared machinery, so several ``sparsebench run`` processes on one
store share the matrix out between them and each cell runs exactly once, on any backend.

The launcher owns the experiment, the parent run and the claims; workers own their cell runs.
With workers in other processes on a sqlite store, the launcher serves the store through an
MLflow server on 127.0.0.1 for the run (``harness.store.server``). A worker that dies ends its cell as
failed with the reason, resumable; the matrix goes on. An interruption (Ctrl-C, SIGTERM, SIGHUP)
asks every running cell to checkpoint and end KILLED (a second one stops them at once), marks the
parent run KILLED and propagates; the next ``sparsebench run`` resumes every cell that did not
finish.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.backends import schedule
from harness.backends.base import Backend, Event, LocalBackend
from harness.errors import UsageError
from harness.matrix import Cell
from harness.plugins import Registry
from harness.run.cell import CellJob, CellResult
from harness.run.progress import MatrixView, make_view
from harness.signals import Interrupted, SignalGuard
from harness.store import claims
from harness.store.checkpoint import CheckpointPolicy, checkpoints_for
from harness.store.claims import Decision, Owner
from harness.store.client import sqlite_path
from harness.store.faults import StoreLost, store_fault
from harness.store.lease import Heartbeat
from harness.store.server import TrackingServer
from harness.store.tracking import Tracker, environment_tags
from reports.schema import FAILED, FINISHED, KILLED, REASON_TAG, STATUS_TAG, TERMINAL_STATES, CellStatus

__all__ = ["MatrixOptions", "open_cell_run", "run_matrix", "stale_code"]

POLL_S = 0.5  # how long the launcher waits on its workers between looks at its own signals


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
    for line in stale_code([r.cell for r in results], tracker, experiment_id):
        print(f"sparsebench: warning: {line}", file=sys.stderr)
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


def stale_code(reused: Sequence[Cell], tracker: Tracker, experiment_id: str) -> list[str]:
    """One line per task or estimator whose installed code differs from the code that produced
    finished cells it reuses. Only a release can: its cell id holds its version label alone, so
    a reinstall of other code under the same label finds the old results; any other code's id
    holds its source hash already."""
    released = [c for c in reused if any(" src:" not in label for label in c.code.values())]
    if not released:
        return []
    stored = tracker.stored_sources(experiment_id, {c.cell_id for c in released})
    stale: dict[tuple[str, str, str], int] = {}
    for cell in released:
        for role, label in cell.code.items():
            before = stored.get(cell.cell_id, {}).get(role)
            if " src:" in label or before is None or before == cell.sources.get(role):
                continue
            name = cell.task if role == "task" else cell.estimator
            stale[role, name, label] = stale.get((role, name, label), 0) + 1
    return [
        f"{role} {name}: the installed code differs from the code that produced {count} finished "
        f"cell(s) stored under the same version ({label}), which are reused as they are; rerun "
        f"them with --force, or bump the version of the package that provides {name}"
        for (role, name, label), count in stale.items()
    ]


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
        status: CellStatus = FINISHED
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
            status = KILLED
            raise
        except BaseException as e:
            status = KILLED if isinstance(e, Exception) and store_fault(e) else FAILED
            raise
        finally:
            if parent is not None:
                if status == FINISHED and any(r.status == FAILED for r in self.results):
                    status = FAILED
                with guard.deferred():
                    self._end_parent(parent, status)
        return self.results

    def _end_parent(self, parent: str, status: CellStatus) -> None:
        """The parent run's final status; a store that fails here is already being reported."""
        try:
            self.tracker.end_run(parent, status)
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
                tracker.end_run(run_id, KILLED)
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
        if run.info.status in TERMINAL_STATES:
            status = run.data.tags.get(STATUS_TAG, run.info.status.lower())
            reason = run.data.tags.get(REASON_TAG, "")
            return CellResult(job.cell, status, reason=reason, run_id=job.run_id)
        if self.stopping:
            self.tracker.end_run(job.run_id, KILLED)
            return CellResult(job.cell, KILLED, reason=f"stopped: {reason}", run_id=job.run_id)
        why = f"{reason}; `sparsebench run` resumes it"
        self.tracker.end_run(job.run_id, FAILED, why, lost=True)  # its checkpoint stays for the resume
        return CellResult(job.cell, FAILED, reason=why, run_id=job.run_id)

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
        killed = [r for r in self.results if r.status == KILLED]
        for job in list(self.in_flight.values()):  # not heard of since: stopped at once, or local
            self.in_flight.pop(job.run_id)
            run = self.tracker.client.get_run(job.run_id)
            if run.info.status == "RUNNING":
                self.tracker.end_run(job.run_id, KILLED)
                killed.append(CellResult(job.cell, KILLED, reason="stopped at once", run_id=job.run_id))
        if isinstance(e, Interrupted) and e.note:  # the in-process cell said where it stopped
            return signum, e.note
        notes = [r.reason or f"{r.cell.name} stopped" for r in killed]
        if len(notes) > 1:
            return signum, f"{len(notes)} cells stopped: " + "; ".join(notes)
        return signum, notes[0] if notes else ""
