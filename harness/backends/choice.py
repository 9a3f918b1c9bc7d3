"""The choice of where cells run: the device, the backend, and how many workers with how many
threads (and which GPUs) a ``--backend``/``--jobs``/``--threads`` request turns into.

The CLI parses the request; this module turns it into a backend, so the CLI builds none itself.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from harness.errors import UsageError

if TYPE_CHECKING:
    from harness.backends.base import Backend
    from harness.matrix import Cell

__all__ = ["Placement", "choose_backend", "pick_device", "use_threads"]


def pick_device(choice: str) -> torch.device:
    """``auto`` takes CUDA when present; asking for CUDA without one is a usage error."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    if choice not in ("cpu", "cuda"):
        raise UsageError(f"--device {choice!r}: choose auto, cpu or cuda")
    return torch.device(choice)


def use_threads(threads: int) -> None:
    """``--threads N`` for cells run in this process (``0``: torch's own choice); pool and Ray
    workers set theirs from ``choose_backend``'s ``threads``."""
    if threads:
        torch.set_num_threads(threads)


@dataclass(frozen=True)
class Placement:
    """The backend chosen (``None``: cells run in this process), the device its cells use, and a few
    words for the run's header line."""

    backend: Backend | None
    device: torch.device
    where: str


def choose_backend(
    kind: str,
    uri: str,
    cells: Sequence[Cell],
    *,
    device_choice: str,
    device: torch.device | None,
    jobs: int | None,
    threads: int,
    address: str | None = None,
) -> Placement:
    """The backend ``kind`` (``local`` or ``ray``) with ``jobs`` cells in flight (``0``: one per core,
    or per GPU on CUDA; ``None``: one) and ``threads`` per worker (``0``: the cores shared out).
    ``device`` is the local device already picked (``pick_device``); Ray picks its own."""
    if kind == "ray":
        from harness.backends.ray_backend import RayBackend

        ray = RayBackend(address, uri, device_choice, cells, jobs=jobs or 0, threads=threads)
        nodes = f"{ray.nodes} node{'s' * (ray.nodes > 1)}"
        where = f" with Ray ({nodes}, up to {ray.slots} cells at once)"
        return Placement(ray, torch.device(ray.device), where)
    assert device is not None, "the local backend runs on a device picked beforehand"
    cores = len(os.sched_getaffinity(0))
    gpus: list[str] = []
    if device.type == "cuda":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpus = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    jobs = jobs if jobs is not None else 1
    if jobs == 0:  # auto
        jobs = len(gpus) or cores
    if jobs == 1:
        return Placement(None, device, "")
    from harness.backends.pool import PoolBackend

    threads = threads or max(1, cores // jobs)
    spread = f", GPUs {','.join(gpus)}" if gpus else ""
    where = f" with {jobs} worker processes x {threads} threads{spread}"
    return Placement(PoolBackend(jobs, threads, gpus), device, where)
