"""Where claimed cells run: the backend interface, the events it reports, and the in-process backend.

A backend only decides *where* a cell runs. The launcher (``harness.run.runner``) claims each cell,
opens its run and hands the backend a ``CellJob``; the backend runs ``harness.run.cell.execute`` on
it somewhere (this process, a local worker process, a Ray task) and reports what happens as
``Event`` values: a cell started, advanced, was evaluated, ended (``done``, with its
``CellResult``), or its worker died under it (``lost``, with the reason). Every backend has the
same claims, checkpoints, statuses and summary, so a cell's metrics do not depend on where it ran.

- ``LocalBackend``: one cell at a time in this process (the default).
- ``harness.backends.pool.PoolBackend``: ``--jobs N`` worker processes on this machine.
- ``harness.backends.ray_backend.RayBackend``: each cell a Ray task with its resource request.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from harness.errors import UsageError
from harness.run.cell import CellJob, CellResult, execute
from harness.signals import Interrupted, SignalGuard
from harness.store.faults import StoreLost
from reports.schema import FAILED, KILLED

__all__ = ["Backend", "Event", "LocalBackend", "Reporter", "run_in_worker"]

EventKind = Literal["start", "step", "eval", "done", "lost"]


@dataclass(frozen=True)
class Event:
    """What happened to the cell whose run is ``key``; plain data that crosses process boundaries."""

    key: str
    kind: EventKind
    name: str = ""
    steps: int = 0
    step: int = 0
    loss: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    result: CellResult | None = None  # done
    reason: str = ""  # lost: why the worker is gone
    usage_error: str = ""  # done: the cell found bad input (a ``UsageError``) only when it ran
    worker: str = ""  # start: host:pid of the process running the cell
    elapsed: float = 0.0  # seconds since the cell started in its worker (rates, ETAs: not the wire's)
    store_lost: StoreLost | None = None  # done: the store or its disk failed under the cell


Deliver = Callable[[Event], None]


class Backend(Protocol):
    """What the runner needs from a backend."""

    name: str
    slots: int  # cells the runner keeps in flight
    remote: bool  # cells run in other processes (they log through a server on a sqlite store)

    def submit(self, job: CellJob) -> None:
        """Start ``job`` (the runner never submits more than ``slots`` at once)."""

    def poll(self, timeout: float, deliver: Deliver) -> None:
        """Deliver what happened, waiting up to ``timeout`` seconds for something to happen."""

    def busy(self) -> bool:
        """Whether any submitted job has not yet been delivered as done or lost."""

    def interrupt(self, signum: int) -> None:
        """Ask every running cell to checkpoint at its next step boundary and end KILLED."""

    def kill(self) -> None:
        """Stop every running cell at once (a second Ctrl-C); their last checkpoints stand."""

    def close(self) -> None:
        """Release workers; called once, after the last poll."""


class Reporter:
    """A worker's progress display: ``execute``'s calls become events, training steps at most
    every ``interval_s`` (a remote channel must not carry one message per step)."""

    def __init__(self, key: str, deliver: Deliver, interval_s: float = 0.5, worker: str = "") -> None:
        self.key, self.deliver, self.interval_s, self.worker = key, deliver, interval_s, worker
        self.step = 0
        self.t0 = self._sent = time.monotonic()

    def start(self, name: str, steps: int, completed: int = 0) -> None:
        self.step = completed
        self.t0 = time.monotonic()
        self.deliver(Event(self.key, "start", name=name, steps=steps, step=completed, worker=self.worker))

    def advance(self, loss: float) -> None:
        self.step += 1
        now = time.monotonic()
        if now - self._sent >= self.interval_s:
            self._sent = now
            self.deliver(Event(self.key, "step", step=self.step, loss=loss, elapsed=now - self.t0))

    def evaluated(self, step: int, metrics: dict[str, float]) -> None:
        elapsed = time.monotonic() - self.t0
        self.deliver(Event(self.key, "eval", step=step, metrics=dict(metrics), elapsed=elapsed))


def run_in_worker(job: CellJob, guard: SignalGuard, deliver: Deliver, worker: str = "", **kw: Any) -> Event:
    """The body of a pool worker or Ray task: run the cell, and say how it ended as a ``done``
    event. An interruption has already been checkpointed and recorded (KILLED) by ``execute``;
    anything that escapes ``execute`` (its store gone, say) leaves the run's state unknown, so
    it is reported as the worker's loss and the launcher records it."""
    reporter = Reporter(job.run_id, deliver, worker=worker, **kw)
    try:
        result = execute(job, guard=guard, progress=reporter)
    except Interrupted as e:
        result = CellResult(job.cell, KILLED, reason=e.note, run_id=job.run_id)
        return Event(job.run_id, "done", result=result)
    except UsageError as e:
        result = CellResult(job.cell, FAILED, reason=str(e), run_id=job.run_id)
        return Event(job.run_id, "done", result=result, usage_error=str(e))
    except StoreLost as e:  # recorded KILLED where the store still took it; the launcher stops
        result = CellResult(job.cell, KILLED, reason=f"the store failed: {e.cause}", run_id=job.run_id)
        return Event(job.run_id, "done", result=result, store_lost=e)
    except Exception as e:  # noqa: BLE001 - reported to the launcher, which records it on the run
        return Event(job.run_id, "lost", reason=f"the worker failed: {type(e).__name__}: {e}"[:2000])
    return Event(job.run_id, "done", result=result)


class LocalBackend:
    """One cell at a time in this process: ``poll`` runs the submitted cell to its end.

    The launcher's registry, tracker, signal guard and heartbeat are the cell's, so an
    interruption propagates from ``poll`` exactly as before there were backends.
    """

    name = "local"
    slots = 1
    remote = False

    def __init__(self, registry: Any, tracker: Any, guard: SignalGuard, heartbeat: Any) -> None:
        self.registry, self.tracker, self.guard, self.heartbeat = registry, tracker, guard, heartbeat
        self.queue: list[CellJob] = []

    def submit(self, job: CellJob) -> None:
        self.queue.append(job)

    def poll(self, timeout: float, deliver: Deliver) -> None:
        if not self.queue:
            return
        job = self.queue.pop(0)
        result = execute(
            job,
            registry=self.registry,
            tracker=self.tracker,
            guard=self.guard,
            heartbeat=self.heartbeat,
            progress=Reporter(job.run_id, deliver, interval_s=0.0),
        )
        deliver(Event(job.run_id, "done", result=result))

    def busy(self) -> bool:
        return bool(self.queue)

    def interrupt(self, signum: int) -> None:
        self.queue.clear()  # the running cell was interrupted in this very process

    def kill(self) -> None:
        self.queue.clear()

    def close(self) -> None:
        return None
