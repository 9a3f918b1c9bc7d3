"""A cell's whole training state, saved atomically and loaded back for an exact resume.

A checkpoint holds the model, the optimiser, the task's own state (``TaskRun.state_dict``), every
random generator (Python, NumPy, torch CPU and CUDA), the next step, the metrics not yet sent to
the store and the training time so far. It is one ``torch.save`` file read back with
``weights_only=True``: plain tensors and containers, no pickled code.

Where it lives: beside a local sqlite store (``<store folder>/checkpoints/<run id>.pt``, written
to a temporary file and ``os.replace``d), or, for a remote store, as an artifact of the cell's
run (``checkpoint/step=<N>.pt``) that the run's tag ``sparsebench.checkpoint`` points at once the
upload is complete. Either way a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from harness.store.client import sqlite_path
from reports.schema import CHECKPOINT_CORRUPT_TAG, CHECKPOINT_FORMAT, CHECKPOINT_TAG

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

__all__ = [
    "ArtifactCheckpoints",
    "CheckpointPolicy",
    "Checkpoints",
    "CorruptCheckpoint",
    "LocalCheckpoints",
    "capture_rng",
    "checkpoints_for",
    "restore_rng",
    "training_state",
]

DEFAULT_MINUTES = 10.0  # a killed cell loses at most this much training, plus one step


@dataclass(frozen=True)
class CheckpointPolicy:
    """When to checkpoint (whichever comes first) and where; plain data for any backend."""

    every_steps: int = 0  # 0: by time only
    every_minutes: float = DEFAULT_MINUTES  # 0: by steps only
    directory: str | None = None  # a local folder, or None for run artifacts

    @classmethod
    def for_store(
        cls, uri: str, every_steps: int = 0, every_minutes: float = DEFAULT_MINUTES
    ) -> CheckpointPolicy:
        db = sqlite_path(uri)
        directory = str(db.resolve().parent / "checkpoints") if db is not None else None
        return cls(every_steps, every_minutes, directory)

    def due(self, steps_since: int, seconds_since: float) -> bool:
        by_steps = self.every_steps > 0 and steps_since >= self.every_steps
        by_time = self.every_minutes > 0 and seconds_since >= 60 * self.every_minutes
        return by_steps or by_time


class Checkpoints:
    """Where a run's checkpoint is kept: ``save``, ``load`` (``None`` if there is none), ``prune``."""

    def save(self, run_id: str, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def load(self, run_id: str, device: torch.device) -> dict[str, Any] | None:
        raise NotImplementedError

    def prune(self, run_id: str) -> None:
        raise NotImplementedError


class CorruptCheckpoint(Exception):
    """A checkpoint that cannot be read back (random bytes, truncated, not ours); it has been set
    aside, and the message names it and where it went."""


def _read(path: Path, device: torch.device) -> dict[str, Any]:
    state = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"not a {CHECKPOINT_FORMAT} checkpoint")
    return state


def _why(e: Exception) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"


class LocalCheckpoints(Checkpoints):
    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def path(self, run_id: str) -> Path:
        return self.directory / f"{run_id}.pt"

    def save(self, run_id: str, state: dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.path(run_id)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{run_id}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)  # atomic: readers see the old file or the new one
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a power cut
        finally:
            os.close(dir_fd)

    def load(self, run_id: str, device: torch.device) -> dict[str, Any] | None:
        path = self.path(run_id)
        if not path.exists():
            return None
        try:
            return _read(path, device)
        except Exception as e:  # unpickling, zip, EOF, permission errors: all mean "cannot resume"
            aside = path.with_name(path.name + ".corrupt")
            try:
                os.replace(path, aside)  # kept for a post-mortem; the next save starts clean
                where = f"set aside as {aside.name}"
            except OSError as moved:
                where = f"could not set it aside ({moved.strerror})"
            raise CorruptCheckpoint(f"checkpoint {path} is corrupt: {_why(e)}; {where}") from None

    def prune(self, run_id: str) -> None:
        self.path(run_id).unlink(missing_ok=True)


class ArtifactCheckpoints(Checkpoints):
    """Checkpoints as run artifacts, for stores other processes or hosts reach over the network."""

    def __init__(self, client: MlflowClient, tracking_uri: str) -> None:
        self.client, self.tracking_uri = client, tracking_uri

    def _repo(self, run_id: str):  # -> ArtifactRepository
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        uri = self.client.get_run(run_id).info.artifact_uri
        return get_artifact_repository(uri, tracking_uri=self.tracking_uri)

    def save(self, run_id: str, state: dict[str, Any]) -> None:
        previous = self.client.get_run(run_id).data.tags.get(CHECKPOINT_TAG)
        name = f"step={state['step']}.pt"
        with tempfile.TemporaryDirectory(prefix="sparsebench-ckpt-") as tmp:
            path = Path(tmp) / name
            torch.save(state, path)
            self.client.log_artifact(run_id, str(path), "checkpoint")
        self.client.set_tag(run_id, CHECKPOINT_TAG, f"checkpoint/{name}")  # now it counts
        if previous and previous != f"checkpoint/{name}":
            self._delete(run_id, previous)

    def load(self, run_id: str, device: torch.device) -> dict[str, Any] | None:
        pointer = self.client.get_run(run_id).data.tags.get(CHECKPOINT_TAG)
        if not pointer:
            return None
        with tempfile.TemporaryDirectory(prefix="sparsebench-ckpt-") as tmp:
            local = self.client.download_artifacts(run_id, pointer, tmp)
            try:
                return _read(Path(local), device)
            except Exception as e:  # the artifact stays; the pointer moves aside so no one loads it
                self.client.set_tag(run_id, CHECKPOINT_CORRUPT_TAG, pointer)
                self.client.delete_tag(run_id, CHECKPOINT_TAG)
                raise CorruptCheckpoint(
                    f"checkpoint {pointer} of run {run_id} is corrupt: {_why(e)}; set aside (tag "
                    f"{CHECKPOINT_CORRUPT_TAG})"
                ) from None

    def prune(self, run_id: str) -> None:
        if self.client.get_run(run_id).data.tags.get(CHECKPOINT_TAG):
            self._delete(run_id, "checkpoint")
            self.client.delete_tag(run_id, CHECKPOINT_TAG)

    def _delete(self, run_id: str, path: str) -> None:
        with contextlib.suppress(Exception):  # an artifact store that cannot delete keeps a file
            self._repo(run_id).delete_artifacts(path)


def checkpoints_for(policy: CheckpointPolicy, client: MlflowClient, tracking_uri: str) -> Checkpoints:
    if policy.directory:
        return LocalCheckpoints(policy.directory)
    return ArtifactCheckpoints(client, tracking_uri)


def training_state(
    *,
    cell_id: str,
    step: int,
    elapsed_s: float,
    model: torch.nn.Module,
    optimiser: torch.optim.Optimizer,
    task: dict[str, Any],
    device: torch.device,
    pending: list[tuple[int, dict[str, float]]],
    last_eval: dict[str, float],
) -> dict[str, Any]:
    """Everything a cell needs to continue from ``step`` exactly: what a checkpoint holds."""
    return {
        "format": CHECKPOINT_FORMAT,
        "cell_id": cell_id,
        "step": step,
        "elapsed_s": elapsed_s,
        "model": model.state_dict(),
        "optimiser": optimiser.state_dict(),
        "task": task,
        "rng": capture_rng(device),
        "pending": [[s, dict(m)] for s, m in pending],
        "last_eval": dict(last_eval),
    }


def capture_rng(device: torch.device) -> dict[str, Any]:
    """Every generator a cell may draw from, as tensors and plain containers."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": numpy["bit_generator"],
            "state": {"key": numpy["key"].numpy().astype(np.uint32), "pos": numpy["pos"]},
            "has_gauss": numpy["has_gauss"],
            "gauss": numpy["gauss"],
        }
    )
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state:
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
