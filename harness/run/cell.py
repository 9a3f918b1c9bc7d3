"""One cell's life in one process: train with checkpoints, resume exactly, record how it ended.

``execute(job)`` is what every backend calls. A ``CellJob`` is plain data (the resolved cell, the
tracking URI, the claimed run, the device, where checkpoints go), so the in-process loop, a
process pool or a Ray task can all run a cell the same way; the launcher has already claimed the
cell (``harness.store.claims``) and opened or adopted its run. The worker owns that run from then on:
it keeps its heartbeat, writes its metrics and checkpoints, and sets its final status.

A resumed cell continues from its checkpoint in the same MLflow run and trains exactly as an
uninterrupted one would (on CPU, bit for bit): metrics it re-computes for steps the store already
holds are not logged twice.
"""

from __future__ import annotations

import contextlib
import os
import random
import resource
import signal
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch

from estimators.base import Unsupported
from harness.errors import UsageError
from harness.matrix import Cell
from harness.plugins import Registry
from harness.run.diagnostics import Diagnostics
from harness.run.loop import Diverged, Hooks, Loop
from harness.signals import Interrupted, SignalGuard
from harness.store.checkpoint import (
    CheckpointPolicy,
    Checkpoints,
    CorruptCheckpoint,
    checkpoints_for,
    restore_rng,
    training_state,
)
from harness.store.claims import Claim
from harness.store.faults import store_fault
from harness.store.lease import Heartbeat
from harness.store.tracking import Tracker
from harness.task import CellSetup, TaskRun
from reports.schema import (
    CHECKPOINT_STEP_TAG,
    DIAGNOSTICS_TAG,
    DIVERGED,
    FAILED,
    FINISHED,
    KILLED,
    NA,
    PRIMARY_METRIC_TAG,
    SELECT_METRIC_TAG,
    STOPPED_TAG,
    TARGET_TAG,
    THREADS_TAG,
    WORKER_TAG,
    CellStatus,
)

__all__ = [
    "CellJob",
    "CellProgressLike",
    "CellResult",
    "Outcome",
    "Superseded",
    "execute",
    "seed_everything",
]

LOG_EVERY = 10  # training metrics every LOG_EVERY steps, sent in one batch at each evaluation
TIME_PREFIXES = ("time/", "summary/")  # wall-clock metrics: never expected to replay equal


#: How a cell ended for the launcher: a status it wrote to the store, or one it only reports
#: (finished earlier, running in another process, taken over by another process).
Outcome = CellStatus | Literal["skipped", "elsewhere", "superseded"]


@dataclass
class CellResult:
    cell: Cell
    status: Outcome
    metric: float | None = None
    wall_s: float = 0.0
    reason: str = ""
    run_id: str | None = None


@dataclass(frozen=True)
class CellJob:
    """Everything a worker needs to run one claimed cell; picklable."""

    cell: Cell
    tracking_uri: str
    run_id: str
    claim: Claim
    device: str
    cache_dir: str
    checkpoints: CheckpointPolicy
    resume: bool = False  # an adopted run: continue from its checkpoint, if it has one
    plugins: tuple[str, ...] = ()  # extra plugin modules, for a worker that loads its own registry


class Superseded(Exception):
    """Another process took this cell's claim over (this one looked dead); stop, write nothing."""


class CellProgressLike(Protocol):
    """What ``execute`` tells a progress display (``harness.run.progress``), in this process or, through
    a worker's channel, in the launcher's."""

    def start(self, name: str, steps: int, completed: int = 0) -> None: ...

    def advance(self, loss: float) -> None: ...

    def evaluated(self, step: int, metrics: dict[str, float]) -> None: ...


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA generators too


def execute(
    job: CellJob,
    *,
    registry: Registry | None = None,
    tracker: Tracker | None = None,
    guard: SignalGuard | None = None,
    heartbeat: Heartbeat | None = None,
    progress: CellProgressLike | None = None,
) -> CellResult:
    """Run a claimed cell to its end in this process; returns how it ended.

    A worker calls it with the job alone; the in-process backend passes the registry, tracker,
    signal guard, heartbeat and progress display it already holds. A ``UsageError`` (bad data
    found only now) and an interruption are recorded on the run, then raised.
    """
    if registry is None:
        from harness import plugins

        registry = plugins.load(job.plugins)
    tracker = tracker or Tracker(job.tracking_uri)
    guard = guard or SignalGuard()  # never entered: signals keep their default behaviour
    with contextlib.ExitStack() as stack:
        beat = heartbeat or stack.enter_context(Heartbeat(tracker.client))
        beat.hold(job.run_id, job.claim)
        try:
            return _execute(job, registry, tracker, guard, beat, progress)
        finally:
            beat.release(job.run_id)


def _execute(
    job: CellJob,
    registry: Registry,
    tracker: Tracker,
    guard: SignalGuard,
    heartbeat: Heartbeat,
    progress: CellProgressLike | None,
) -> CellResult:
    cell, run_id = job.cell, job.run_id
    store = checkpoints_for(job.checkpoints, tracker.client, job.tracking_uri)
    if cell.na_reason is not None:
        with guard.atomic():
            tracker.end_run(run_id, NA, cell.na_reason)
        return CellResult(cell, NA, reason=cell.na_reason, run_id=run_id)
    training = _Training(job, registry, tracker, store, guard, heartbeat, progress)
    try:
        result = training.run()
    except Superseded as e:
        return CellResult(cell, "superseded", reason=str(e), run_id=run_id)
    except KeyboardInterrupt as e:
        with guard.deferred():
            tracker.end_run(run_id, KILLED)  # its checkpoint stays: the next run resumes it
        note = e.note if isinstance(e, Interrupted) and e.note else training.where()
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        raise Interrupted(signum, note) from None
    except Unsupported as e:  # build() or the task found it cannot serve the cell after all
        reason = str(e) or "the estimator raised Unsupported"
        with guard.atomic():
            tracker.end_run(run_id, NA, reason, checkpoints=store)
        return CellResult(cell, NA, reason=reason, run_id=run_id)
    except Diverged as e:
        with guard.atomic():
            tracker.end_run(run_id, DIVERGED, str(e), checkpoints=store)  # a result, not an error
        return CellResult(cell, DIVERGED, reason=str(e), run_id=run_id)
    except Exception as e:
        lost = store_fault(e)
        if lost is not None:  # not the cell's fault: KILLED if that can still be written, resumable
            with guard.deferred(), contextlib.suppress(Exception):
                why = f"the store failed: {lost.cause}; `sparsebench run` resumes it"
                tracker.end_run(run_id, KILLED, why)  # its checkpoint stays: the next run resumes it
            raise lost from None
        reason = f"{type(e).__name__}: {e}"
        with guard.atomic():
            tracker.log_text(run_id, "traceback.txt", traceback.format_exc())
            # a failed cell starts afresh: the failure may be in the code
            tracker.end_run(run_id, FAILED, reason, checkpoints=store)
        if isinstance(e, UsageError):
            raise
        print(f"cell {cell.name} failed: {reason}", file=sys.stderr)
        return CellResult(cell, FAILED, reason=reason, run_id=run_id)
    with guard.atomic():
        tracker.end_run(run_id, FINISHED, checkpoints=store)
    return result


def _peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # CPU: the process high-water mark (ru_maxrss is KiB on Linux).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _MetricSink:
    """Sends metric rows to the run; after a resume, leaves out (key, step) pairs it already has."""

    def __init__(self, tracker: Tracker, run_id: str, logged: dict[str, dict[int, float]]) -> None:
        self.tracker, self.run_id, self.logged = tracker, run_id, logged
        self.mismatches = 0

    def log(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        if self.logged:
            fresh = []
            for step, values in rows:
                keep = {}
                for key, value in values.items():
                    before = self.logged.get(key, {}).get(step)
                    if before is None:
                        keep[key] = value
                    elif before != value and not key.startswith(TIME_PREFIXES):
                        self.mismatches += 1
                if keep:
                    fresh.append((step, keep))
            rows = fresh
        self.tracker.log_metrics(self.run_id, rows)


class _Training(Hooks):
    """One cell's loop (``harness.run.loop``) with what the runner hangs on it: metrics to the
    store, checkpoints, the heartbeat's fencing, signals, snapshots and progress; and the whole
    state, so that it can be saved and restored as one."""

    def __init__(
        self,
        job: CellJob,
        registry: Registry,
        tracker: Tracker,
        store: Checkpoints,
        guard: SignalGuard,
        heartbeat: Heartbeat,
        progress: CellProgressLike | None,
    ) -> None:
        self.job, self.cell, self.run_id = job, job.cell, job.run_id
        self.registry, self.tracker, self.store = registry, tracker, store
        self.guard, self.heartbeat, self.progress = guard, heartbeat, progress
        self.device = torch.device(job.device)
        self.elapsed_before = 0.0
        self.pending: list[tuple[int, dict[str, float]]] = []
        self.last_eval: dict[str, float] = {}
        self.saved_step: int | None = None
        self.saved_at = time.perf_counter()
        self.t0 = time.perf_counter()

    def where(self) -> str:
        """Where an interruption leaves the cell, for the CLI's last line."""
        if self.saved_step is None:
            return f"{self.cell.name} had no checkpoint yet (it restarts from step 0)"
        return f"{self.cell.name} resumes from its checkpoint at step {self.saved_step}"

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t0

    def _build(self) -> TaskRun:
        """Seed, then build the layer, the task's data and model, and the optimiser: the fresh
        start that a checkpoint, if any, then overwrites."""
        cell, device = self.cell, self.device
        task = self.registry.task(cell.task)
        seed_everything(cell.seed)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        layer = self.registry.estimator(cell.estimator).build(cell.spec, cell.estimator_params)
        setup = CellSetup(
            cell.task_params, layer, cell.kind, device, cell.seed, Path(self.job.cache_dir), cell.spec
        )
        run = task.setup(setup)
        if run.steps < 1 or run.eval_every < 1:
            raise ValueError(f"task {task.name} set up {run.steps} steps evaluated every {run.eval_every}")
        self.tracker.set_tags(
            self.run_id,
            {
                **run.provenance,
                PRIMARY_METRIC_TAG: task.primary_metric,
                SELECT_METRIC_TAG: task.select_metric,
                **({TARGET_TAG: str(run.target)} if run.target is not None else {}),
                THREADS_TAG: str(torch.get_num_threads()),
                WORKER_TAG: f"{socket.gethostname()}:{os.getpid()}",
            },
        )
        if not self.job.resume:  # a resumed run already records its dataset
            self.tracker.log_dataset(self.run_id, run.provenance)
        run.model.to(device)
        diagnostics = Diagnostics(cell.diagnose, cell.seed) if cell.diagnose.on else None
        if diagnostics is not None:
            self.tracker.set_tags(self.run_id, {DIAGNOSTICS_TAG: str(cell.diagnose)})
        self.loop = Loop(run, cell.task_params["lr"], self, diagnostics)
        return run

    def run(self) -> CellResult:
        cell, device = self.cell, self.device
        self.task_run = run = self._build()
        logged: dict[str, dict[int, float]] = {}
        restored = False
        if self.job.resume:
            logged = self.tracker.logged_metrics(self.run_id)
            state = self._load_checkpoint()
            if state is not None:
                self._restore(state)
                restored = True
        self.sink = _MetricSink(self.tracker, self.run_id, logged)
        self.t0 = self.saved_at = time.perf_counter()
        if self.progress:
            self.progress.start(cell.name, run.steps, completed=self.loop.step)
        try:  # whatever ends the loop, the metrics computed so far reach the store
            self.loop.train(evaluate_first=not restored)
            with self.guard.deferred():
                wall, steps = self.elapsed(), self.loop.step  # the task's steps unless the stop rule ended it
                summary = {
                    "summary/wall_s": wall,
                    "summary/peak_mem_mb": _peak_mem_mb(device),
                    "summary/steps_per_s": steps / wall if wall > 0 else 0.0,
                }
                why = ""
                if self.loop.stopped is not None:
                    summary["summary/stopped_step"] = float(self.loop.stopped)
                    why = f"solved for {run.stop_after} evaluations ({run.target})"
                    self.tracker.set_tags(self.run_id, {STOPPED_TAG: why})
                self.pending.append((steps, summary))
        finally:
            if self.heartbeat.lost(self.run_id) is None:
                self.sink.log(self.pending)
        if self.sink.mismatches:
            print(
                f"cell {cell.name}: {self.sink.mismatches} metric values recomputed after the resume differ "
                "from those logged before it (nondeterministic kernels?); the first ones are kept",
                file=sys.stderr,
            )
        primary = self.registry.task(cell.task).primary_metric
        stopped = "" if self.loop.stopped is None else f"stopped at step {self.loop.stopped}: {why}"
        return CellResult(cell, FINISHED, self.last_eval.get(primary), wall, stopped, self.run_id)

    def _load_checkpoint(self) -> dict[str, Any] | None:
        """The run's checkpoint; a corrupt one (set aside by the store) means step 0 in this run.

        Replaying from step 0 with the cell's seed recomputes exactly the metrics the run already
        holds (on CPU, bit for bit): the sink leaves those steps out, so each step stays logged once
        with its first value, and any value that came out different is counted as a mismatch."""
        try:
            return self.store.load(self.run_id, self.device)
        except CorruptCheckpoint as e:
            print(
                f"sparsebench: warning: {e}; cell {self.cell.name} restarts from step 0 in the same run",
                file=sys.stderr,
            )
            return None

    def boundary(self, step: int, last: bool = False) -> None:
        """Between two steps: stop if superseded, checkpoint if due or interrupted."""
        lost = self.heartbeat.lost(self.run_id)
        if lost:
            raise Superseded(lost)
        signum = self.guard.pending
        if last:
            return  # the cell is done; its final status is written before a pending signal acts
        due = self.job.checkpoints.due(step - (self.saved_step or 0), time.perf_counter() - self.saved_at)
        if (due or signum is not None) and step != self.saved_step:
            self._save(step)
        if signum is not None:
            raise Interrupted(signum, f"{self.cell.name} checkpointed at step {step}")

    def section(self) -> contextlib.AbstractContextManager[object]:
        return self.guard.deferred()  # a signal waits for the step to end

    def trained(self, step: int, loss: float, metrics: dict[str, float]) -> None:
        if step % LOG_EVERY == 0:
            self.pending.append((step, {"train/objective": loss, **metrics}))

    def evaluated(self, step: int, metrics: dict[str, float]) -> None:
        self.last_eval = metrics
        elapsed = self.elapsed()
        row = {**metrics, "time/elapsed_s": elapsed}
        if self.loop.first_met == step and self.loop.streak == 1:  # the target met for the first time
            row |= {"summary/target_step": float(step), "summary/target_wall_s": elapsed}
        self.pending.append((step, row))
        self.sink.log(self.pending)  # each evaluation makes the dashboard current
        self.pending.clear()
        if self.progress:
            self.progress.evaluated(step, metrics)

    def diagnosed(self, step: int, metrics: dict[str, float]) -> None:
        self.pending.append((step, metrics))  # sent with the next evaluation's rows

    def advanced(self, loss: float) -> None:
        if self.progress:
            self.progress.advance(loss)

    def snapshot(self, step: int) -> None:
        if self.task_run.write_artifacts is None:
            return
        with tempfile.TemporaryDirectory() as tmp:
            self.task_run.write_artifacts(step, Path(tmp))
            self.tracker.log_dir(self.run_id, Path(tmp), f"snapshots/step={step}")

    def _save(self, step: int) -> None:
        state = training_state(
            cell_id=self.cell.cell_id,
            step=step,
            elapsed_s=self.elapsed(),
            model=self.task_run.model,
            optimiser=self.loop.optimiser,
            task=self.task_run.state_dict() if self.task_run.state_dict else {},
            device=self.device,
            pending=self.pending,
            last_eval=self.last_eval,
        )
        state["target"] = self.loop.target_state()  # the stop rule's count continues after a resume
        with self.guard.deferred():
            self.store.save(self.run_id, state)
            self.tracker.set_tags(self.run_id, {CHECKPOINT_STEP_TAG: str(step)})
        self.saved_step, self.saved_at = step, time.perf_counter()

    def _restore(self, state: dict[str, Any]) -> None:
        if state.get("cell_id") != self.cell.cell_id:
            raise ValueError(f"the checkpoint of run {self.run_id} belongs to cell {state.get('cell_id')}")
        self.task_run.model.load_state_dict(state["model"])
        self.loop.optimiser.load_state_dict(state["optimiser"])
        if self.task_run.load_state_dict is not None:
            self.task_run.load_state_dict(state["task"])
        elif state["task"]:
            raise ValueError(f"task {self.cell.task} saved state but cannot load it")
        restore_rng(state["rng"])
        self.loop.step = self.saved_step = int(state["step"])
        self.elapsed_before = float(state["elapsed_s"])
        self.pending = [(int(s), dict(m)) for s, m in state["pending"]]
        self.last_eval = dict(state["last_eval"])
        self.loop.load_target_state(state.get("target", {}))
