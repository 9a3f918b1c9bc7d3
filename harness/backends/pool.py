"""``--jobs N``: N worker processes on this machine, each running one cell at a time.

Each worker is a fresh interpreter (``spawn``: the launcher holds threads and database
connections that must not be forked) with its own torch thread count and, on a GPU box, its own
GPU (``CUDA_VISIBLE_DEVICES``, round robin). It talks to the launcher over its own pipe, so the
launcher knows which cell each worker holds: when a worker dies (killed, out of memory), only
its cell is lost, that cell is recorded as failed with the reason (and resumed from its
checkpoint by the next ``run``), a fresh worker takes its place and the other cells carry on.
``concurrent.futures.ProcessPoolExecutor`` cannot do that: one dead worker breaks the whole
pool and every cell in flight with it.

Signals: the workers run in their own process group, so a Ctrl-C in the terminal reaches only
the launcher, which forwards it once (SIGTERM) to the busy workers; each checkpoints at its next
step boundary and marks its cell KILLED. A worker also dies with its launcher (Linux
``PR_SET_PDEATHSIG``), so a launcher killed outright leaves no orphans training on.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from harness.backends.base import Deliver, Event, run_in_worker
from harness.run.cell import CellJob
from harness.signals import die_with_parent

__all__ = ["PoolBackend"]

STOP_S = 30.0  # how long close() waits for idle workers to exit before killing them


def _serve(conn: Connection, threads: int, env: dict[str, str]) -> None:
    """A worker's life: set up, then run the jobs the launcher sends until it sends ``None``."""
    os.setpgrp()  # the terminal's Ctrl-C goes to the launcher, which forwards it once
    die_with_parent()
    os.environ.update(env)  # before CUDA is first touched: CUDA_VISIBLE_DEVICES
    import torch

    from harness.signals import SignalGuard
    from harness.store.client import quiet_mlflow

    torch.set_num_threads(threads)
    quiet_mlflow()
    worker = f"{socket.gethostname()}:{os.getpid()}"
    with SignalGuard(escalate=False) as guard:
        while True:
            try:
                job = conn.recv()
            except (EOFError, KeyboardInterrupt):
                return
            if job is None:
                return
            conn.send(run_in_worker(job, guard, conn.send, worker=worker))
            if guard.pending is not None:
                return  # interrupted: the launcher is stopping


@dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: Connection
    job: CellJob | None = None

    def death(self) -> str:
        code = self.process.exitcode
        if code is not None and code < 0:
            how = f"was killed by {signal.Signals(-code).name}"
        else:
            how = f"exited with code {code}"
        return f"worker pid {self.process.pid} {how}"


class PoolBackend:
    """``jobs`` local worker processes with ``threads`` torch threads each."""

    name = "pool"
    remote = True

    def __init__(self, jobs: int, threads: int, gpus: list[str] | None = None) -> None:
        self.slots = jobs
        self.threads = threads
        self.gpus = gpus or []  # device ids to spread the workers over; [] on CPU
        self.context = multiprocessing.get_context("spawn")
        self.workers: list[_Worker] = []
        self._started = 0
        for _ in range(jobs):  # they import torch while the launcher opens the store and its server
            self._spawn()

    def _spawn(self) -> _Worker:
        env = {}
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = self.gpus[self._started % len(self.gpus)]
        self._started += 1
        parent, child = self.context.Pipe()
        process = self.context.Process(
            target=_serve, args=(child, self.threads, env), name=f"sparsebench-worker-{self._started}"
        )
        process.start()
        child.close()
        worker = _Worker(process, parent)
        self.workers.append(worker)
        return worker

    def submit(self, job: CellJob) -> None:
        idle = [w for w in self.workers if w.job is None and w.process.is_alive()]
        worker = idle[0] if idle else self._spawn()
        worker.job = job
        worker.conn.send(job)

    def poll(self, timeout: float, deliver: Deliver) -> None:
        busy = [w for w in self.workers if w.job is not None]
        if not busy:
            return
        by_handle = {}
        for w in busy:
            by_handle[w.conn] = w
            by_handle[w.process.sentinel] = w
        for handle in wait(list(by_handle), timeout):
            worker = by_handle[handle]
            if worker.job is not None:
                self._drain(worker, deliver)

    def _drain(self, worker: _Worker, deliver: Deliver) -> None:
        """Everything the worker has sent; if it is gone, its cell is lost."""
        try:
            while worker.conn.poll():
                event: Event = worker.conn.recv()
                if event.kind in ("done", "lost"):
                    worker.job = None
                deliver(event)
        except (EOFError, OSError):
            pass  # the worker died; whatever it sent in full was delivered
        if worker.job is not None and not worker.process.is_alive():
            worker.process.join()
            deliver(Event(worker.job.run_id, "lost", reason=worker.death()))
            worker.job = None
        if not worker.process.is_alive():
            worker.conn.close()
            self.workers.remove(worker)

    def busy(self) -> bool:
        return any(w.job is not None for w in self.workers)

    def interrupt(self, signum: int) -> None:
        for w in self.workers:
            if w.job is not None and w.process.is_alive():
                os.kill(w.process.pid, signal.SIGTERM)

    def kill(self) -> None:
        for w in self.workers:
            if w.process.is_alive():
                w.process.kill()
        for w in self.workers:
            w.process.join()
            w.conn.close()
        self.workers.clear()

    def close(self) -> None:
        for w in self.workers:
            try:
                w.conn.send(None)
            except OSError:
                continue
        for w in self.workers:
            w.process.join(STOP_S)
            if w.process.is_alive():
                w.process.kill()
                w.process.join()
            w.conn.close()
        self.workers.clear()
