"""``--backend ray``: each cell a Ray task with its resource request, on one machine or a cluster.

Ray (``pip install 'sparsebench[ray]'``) schedules, places and retries; sparsebench keeps what it
keeps on every backend (claims, checkpoints, statuses, the summary). A cell asks for
``num_cpus`` (its torch thread count) and, on CUDA, ``num_gpus`` (fractional, so that small cells
share a GPU), from the task's ``resources`` or the config's (``harness.matrix``).

- No ``--address``: a Ray instance on this machine for the run (all its cores and GPUs).
- ``--address auto`` / ``HOST:PORT``: a running cluster (``ray start --head``), this machine one of
  its nodes. ``--address ray://HOST:10001``: a remote cluster through Ray Client.

Workers on other nodes reach neither a sqlite file nor checkpoints beside it, so with more than
one node (or through Ray Client) the store must be an MLflow server that every node reaches
(``--tracking-uri http://HOST:5000``); checkpoints then travel as run artifacts. The launcher
checks this after connecting and refuses with one line otherwise.

Faults: a task whose worker process dies is retried by Ray (``RETRIES`` times), and a retry
resumes the cell from its checkpoint in the same run; when the retries are spent (or the node is
gone), the cell is recorded as failed with Ray's reason and the next ``run`` resumes it. Progress
travels through a small actor (``_Events``), to which tasks send without waiting.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from harness.backends.base import Deliver, Event, run_in_worker
from harness.errors import UsageError
from harness.matrix import Cell
from harness.run.cell import CellJob
from reports.schema import RAY_ATTEMPT_TAG

__all__ = ["RETRIES", "RayBackend", "resources_for"]

RETRIES = 2  # a task whose worker dies is run again this many times (resuming from its checkpoint)
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "0.0.0.0")


def resources_for(cell: Cell, device: str) -> dict[str, float]:
    """What one cell asks of a node: its CPUs, and its share of a GPU when it runs on CUDA."""
    cpus = cell.resources.get("num_cpus", 1.0)
    gpus = cell.resources.get("num_gpus", 1.0) if device.startswith("cuda") else 0.0
    return {"num_cpus": cpus, "num_gpus": gpus}


def _remote_store_problem(uri: str, nodes: int, client: bool) -> str | None:
    """Why the workers of this cluster cannot reach ``uri``, or ``None``."""
    if nodes <= 1 and not client:
        return None
    where = "through Ray Client" if client else f"on {nodes} nodes"
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return (
            f"--backend ray {where}: workers on other machines cannot reach the store {uri}; start an "
            "MLflow server that every node reaches (mlflow server --host 0.0.0.0 --port 5000 ...) and "
            "pass --tracking-uri http://HEAD:5000"
        )
    if parts.hostname in LOCAL_HOSTS:
        return (
            f"--backend ray {where}: --tracking-uri {uri} names this machine only; give an address "
            "that every node reaches, e.g. --tracking-uri http://HEAD:5000"
        )
    return None


class _Events:
    """A mailbox actor: tasks ``put`` progress events without waiting; the launcher ``drain``s."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def put(self, event: Event) -> None:
        self.events.append(event)

    def drain(self) -> list[Event]:
        events, self.events = self.events, []
        return events


def _run_cell(job: CellJob, events: Any, threads: int) -> Event:
    """One cell in a Ray worker process."""
    import torch

    from harness.signals import SignalGuard
    from harness.store.client import quiet_mlflow
    from harness.store.tracking import Tracker

    torch.set_num_threads(threads)
    quiet_mlflow()
    client = Tracker(job.tracking_uri, create=False).client
    if client.get_run(job.run_id).data.tags.get(RAY_ATTEMPT_TAG) == str(job.claim.generation):
        job = dataclasses.replace(job, resume=True)  # Ray's retry after a dead worker: resume
    else:
        client.set_tag(job.run_id, RAY_ATTEMPT_TAG, str(job.claim.generation))
    worker = f"{socket.gethostname()}:{os.getpid()}"
    with SignalGuard(escalate=False) as guard:  # ray.cancel's KeyboardInterrupt: checkpoint, KILLED
        return run_in_worker(job, guard, lambda event: events.put.remote(event), worker=worker)


def _worker_env() -> dict[str, str]:
    """What workers need from this process's environment: the data root, the plugin settings,
    and this process's own source folders (a checkout, local plugin modules), minus installed
    packages. Every node must have sparsebench and the plugins' packages installed; a folder a
    node lacks is skipped by its Python."""
    from harness import plugins
    from harness.task import DATA_ROOT_ENV

    keys = (DATA_ROOT_ENV, plugins.ENV_VAR, plugins.DISABLE_ENV_VAR)
    env = {k: os.environ[k] for k in keys if os.environ.get(k)}
    installed = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix)}
    own = [
        p
        for p in sys.path
        if p and os.path.isdir(p) and not any(os.path.realpath(p).startswith(i) for i in installed)
    ]
    if own:
        env["PYTHONPATH"] = os.pathsep.join(own)
    return env


class RayBackend:
    """Cells as Ray tasks; ``jobs`` caps how many are in flight (default: what the cluster holds)."""

    name = "ray"
    remote = True

    def __init__(
        self,
        address: str | None,
        tracking_uri: str,
        device: str,
        cells: Sequence[Cell],
        jobs: int = 0,
        threads: int = 0,
    ) -> None:
        try:
            import ray
        except ImportError:
            raise UsageError(
                "--backend ray needs Ray: pip install 'sparsebench[ray]' (or pip install ray)"
            ) from None
        client = bool(address and address.startswith("ray://"))
        problem = _remote_store_problem(tracking_uri, 1, client)  # Ray Client: known before connecting
        if problem:
            raise UsageError(problem)
        self.ray = ray
        local = address is None
        if local:  # an instance of our own, for this run: its token needs no announcement
            logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        try:
            ray.init(
                address=address,
                include_dashboard=False if local else None,
                runtime_env={"env_vars": _worker_env()},
                logging_level=logging.WARNING,
            )
        except (ConnectionError, RuntimeError, ValueError) as e:
            detail = " ".join(str(e).split())[:300]
            raise UsageError(f"--backend ray --address {address}: cannot connect to Ray: {detail}") from None
        except ImportError as e:  # ray:// without the client extra
            raise UsageError(
                f"--address {address}: Ray Client needs pip install 'ray[client]' ({e})"
            ) from None
        try:
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            problem = _remote_store_problem(tracking_uri, len(nodes), client)
            if problem:
                raise UsageError(problem)
            total = ray.cluster_resources()
            self.device = self._device(device, total.get("GPU", 0.0))
            self.nodes = len(nodes)
            requests = [resources_for(c, self.device) for c in cells] or [{"num_cpus": 1.0, "num_gpus": 0.0}]
            if self.device.startswith("cuda"):
                fit = total.get("GPU", 0.0) / max(min(r["num_gpus"] for r in requests), 1e-9)
            else:
                fit = total.get("CPU", 1.0) / max(min(r["num_cpus"] for r in requests), 1e-9)
            self.slots = jobs or max(1, int(fit))
            self.threads = threads
            self.events = ray.remote(num_cpus=0)(_Events).remote()
            self.task = ray.remote(_run_cell)
        except BaseException:
            ray.shutdown()
            raise
        self.refs: dict[Any, CellJob] = {}

    @staticmethod
    def _device(choice: str, gpus: float) -> str:
        """``auto`` is CUDA when the cluster has GPUs (this machine may have none)."""
        if choice == "auto":
            return "cuda" if gpus > 0 else "cpu"
        if choice == "cuda" and gpus <= 0:
            raise UsageError("--device cuda: the Ray cluster has no GPU; use --device cpu or auto")
        if choice not in ("cpu", "cuda"):
            raise UsageError(f"--device {choice!r}: choose auto, cpu or cuda")
        return choice

    def submit(self, job: CellJob) -> None:
        request = resources_for(job.cell, self.device)
        threads = self.threads or max(1, int(request["num_cpus"]))
        options = {**request, "max_retries": RETRIES, "retry_exceptions": False}
        ref = self.task.options(**options).remote(job, self.events, threads)
        self.refs[ref] = job

    def poll(self, timeout: float, deliver: Deliver) -> None:
        if not self.refs:
            return
        ready, _ = self.ray.wait(list(self.refs), num_returns=1, timeout=timeout)
        if ready:  # and whatever else has ended meanwhile
            ready, _ = self.ray.wait(list(self.refs), num_returns=len(self.refs), timeout=0)
        for event in self.ray.get(self.events.drain.remote()):
            deliver(event)
        for ref in ready:
            job = self.refs.pop(ref)
            try:
                event = self.ray.get(ref)
            except self.ray.exceptions.RayError as e:
                reason = " ".join(str(e).split())[:500]
                event = Event(job.run_id, "lost", reason=f"Ray: {type(e).__name__}: {reason}")
            deliver(event)

    def busy(self) -> bool:
        return bool(self.refs)

    def interrupt(self, signum: int) -> None:
        for ref in self.refs:
            self.ray.cancel(ref, force=False)  # a KeyboardInterrupt in the task: checkpoint, KILLED

    def kill(self) -> None:
        for ref in self.refs:
            self.ray.cancel(ref, force=True)
        self.refs.clear()

    def close(self) -> None:
        self.ray.shutdown()
