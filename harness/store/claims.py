"""Claims and leases: each cell runs in one process at a time, across launchers and workers.

The primitive is the one atomic test-and-set every MLflow backend offers: experiment names are
unique, enforced by the database (sqlite written directly, or any SQL store behind an ``mlflow
server``), so of several processes that create the same name exactly one succeeds. A claim on
a cell is the experiment ``sparsebench.claim/<experiment id>/<cell id>/<generation>``, tagged
with its owner (``host:pid:nonce``) and the time; it is deleted (soft) at once so that dashboards
do not list it, and its name stays taken. Generations only grow: taking a cell over from a dead
owner means winning generation ``g + 1``, which also fences the old owner (its heartbeat sees the
newer generation and it stops without writing).

A run whose worker died under it (a killed process, a lost node: ``LOST_TAG``) ends FAILED, yet
unlike a failure of the cell's own code it is resumed from its checkpoint by the next launcher.

A claim is *released* when the cell's run carries the claim's generation (tag
``sparsebench.claim``) and has ended. While it is held, its owner is *gone* when it ran on this
host and its pid has exited, or when its heartbeat (tag ``sparsebench.heartbeat`` on the run,
stamped every ``HEARTBEAT_S`` by ``harness.store.lease``) is older than the stale limit.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from reports.schema import (
    CELL,
    CELL_ID_TAG,
    CELLS_FILTER,
    CLAIM,
    CLAIM_RUN_PREFIX,
    CLAIM_TAG,
    HEARTBEAT_TAG,
    KILLED,
    LOST_TAG,
    MATRIX,
    OWNER_TAG,
    PREFIX,
    REASON_TAG,
    RESUME_TAGS,
    ROLE_TAG,
    STATUS_TAG,
    TERMINAL_STATES,
)

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

__all__ = [
    "Claim",
    "Decision",
    "Owner",
    "acquire",
    "current_claim",
    "gone",
    "holder_gone",
    "latest_run",
    "reconcile",
    "released",
    "resumable",
    "try_claim",
]

HEARTBEAT_S = 30.0
DEFAULT_STALE_S = 300.0  # five minutes without a heartbeat: the owner is gone

_NONCES: dict[int, str] = {}


@dataclass(frozen=True)
class Owner:
    """A process that holds claims; the nonce tells apart two processes that reused a pid."""

    host: str
    pid: int
    nonce: str

    @classmethod
    def me(cls) -> Owner:
        pid = os.getpid()  # a forked worker is a new owner
        nonce = _NONCES.setdefault(pid, uuid.uuid4().hex[:8])
        return cls(socket.gethostname(), pid, nonce)

    @classmethod
    def parse(cls, token: str | None) -> Owner | None:
        parts = (token or "").rsplit(":", 2)
        if len(parts) != 3 or not parts[1].isdigit():
            return None
        return cls(parts[0], int(parts[1]), parts[2])

    @property
    def token(self) -> str:
        return f"{self.host}:{self.pid}:{self.nonce}"

    def exited(self) -> bool:
        """True only when this owner ran on this host and its pid is gone."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, someone else's
            return False
        return False

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host}"


@dataclass(frozen=True)
class Claim:
    """A won claim: plain data, so it travels with a cell to a worker."""

    experiment_id: str
    cell_id: str
    generation: int
    owner: str  # Owner.token
    claimed_at: float = 0.0


@dataclass(frozen=True)
class Decision:
    """What a launcher does with a cell: run it afresh, resume its run, or leave it."""

    action: Literal["run", "resume", "skip", "busy"]
    claim: Claim | None = None
    run: Run | None = None  # the run to resume, or the latest earlier run
    reason: str = ""


def _name(experiment_id: str, cell_id: str, generation: int | None = None) -> str:
    base = f"{CLAIM_RUN_PREFIX}/{experiment_id}/{cell_id}/"
    return base if generation is None else f"{base}{generation:06d}"


def current_claim(client: MlflowClient, experiment_id: str, cell_id: str) -> Claim | None:
    """The highest generation claimed on a cell, or ``None`` if it was never claimed."""
    from mlflow.entities import ViewType

    found = client.search_experiments(
        view_type=ViewType.ALL,
        filter_string=f"name LIKE '{_name(experiment_id, cell_id)}%'",
        order_by=["name DESC"],
        max_results=1,
    )
    if not found:
        return None
    exp = found[0]
    return Claim(
        experiment_id,
        cell_id,
        int(exp.name.rsplit("/", 1)[1]),
        exp.tags.get("owner", ""),
        float(exp.tags.get("claimed_at", "0") or 0),
    )


def try_claim(
    client: MlflowClient,
    experiment_id: str,
    cell_id: str,
    generation: int,
    owner: Owner,
    artifact_root: str | None = None,
) -> Claim | None:
    """Claim ``generation`` of a cell; ``None`` when another process won it."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    now = time.time()
    try:
        claim_exp = client.create_experiment(
            _name(experiment_id, cell_id, generation),
            # never written to; set so that no ./mlruns folder is implied beside a local store
            artifact_location=f"{artifact_root}/claims" if artifact_root else None,
            tags={"owner": owner.token, "claimed_at": f"{now:.3f}", ROLE_TAG: CLAIM},
        )
    except MlflowException as e:
        if e.error_code == ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            return None
        raise
    client.delete_experiment(claim_exp)  # out of the dashboard's way; the name stays taken
    return Claim(experiment_id, cell_id, generation, owner.token, now)


def gone(
    owner_token: str | None, heartbeat: float | None, stale_s: float, now: float | None = None
) -> str | None:
    """Why the owner of a claim or run counts as gone, or ``None`` while it may be alive."""
    owner = Owner.parse(owner_token)
    if owner is None:
        return "no owner recorded"
    if owner.exited():
        return f"{owner} has exited"
    age = (now or time.time()) - (heartbeat or 0.0)
    if age > stale_s:
        return f"no heartbeat from {owner} for {age / 60:.1f} min"
    return None


def _heartbeat(run: Run | None) -> float | None:
    if run is None:
        return None
    try:
        return float(run.data.tags[HEARTBEAT_TAG])
    except (KeyError, ValueError):
        return None


def _run_claim(run: Run | None) -> int | None:
    try:
        return int(run.data.tags[CLAIM_TAG]) if run is not None else None
    except (KeyError, ValueError):
        return None


def holder_gone(claim: Claim, run: Run | None, stale_s: float) -> str | None:
    """For a held claim: why its owner is gone, or ``None`` while it may be alive. Its run's
    heartbeat counts once the run carries the claim; until then, the time of the claim."""
    beat = claim.claimed_at
    if _run_claim(run) == claim.generation:
        beat = _heartbeat(run) or beat
    return gone(claim.owner, beat, stale_s)


def released(claim: Claim, run: Run | None) -> bool:
    return run is not None and _run_claim(run) == claim.generation and run.info.status in TERMINAL_STATES


def latest_run(client: MlflowClient, experiment_id: str, cell_id: str) -> Run | None:
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{CELL_ID_TAG}` = '{cell_id}' and {CELLS_FILTER}",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def acquire(
    client: MlflowClient,
    experiment_id: str,
    cell_id: str,
    *,
    force: bool,
    env_tags: dict[str, str],
    retry: Collection[str] = (),
    stale_s: float = DEFAULT_STALE_S,
    artifact_root: str | None = None,
    owner: Owner | None = None,
) -> Decision:
    """Decide a cell and, unless it is finished or live elsewhere, claim it.

    A finished cell is left alone unless ``force``, or its status tag (diverged, n/a) is in ``retry``.

    The claim is read before the run so that a run that ends in between is seen as released.
    """
    owner = owner or Owner.me()
    claim = current_claim(client, experiment_id, cell_id)
    run = latest_run(client, experiment_id, cell_id)
    if (
        run is not None
        and run.info.status == "FINISHED"
        and not force
        and run.data.tags.get(STATUS_TAG, "") not in retry
    ):
        return Decision("skip", run=run, reason="finished earlier")
    if claim is not None and not released(claim, run):
        why = holder_gone(claim, run, stale_s)
        if why is None:
            return Decision("busy", run=run, reason=f"running in {Owner.parse(claim.owner)}")
    generation = (claim.generation if claim else 0) + 1
    won = try_claim(client, experiment_id, cell_id, generation, owner, artifact_root)
    if won is None:
        winner = current_claim(client, experiment_id, cell_id)
        who = Owner.parse(winner.owner) if winner else "another process"
        return Decision("busy", run=run, reason=f"claimed by {who} a moment ago")
    if run is not None and resumable(run):
        mismatch = _environment_change(run, env_tags)
        if mismatch is None:
            return Decision("resume", won, run)
        return Decision("run", won, run, reason=f"not resumed: {mismatch}")
    return Decision("run", won, run)


def resumable(run: Run) -> bool:
    """Interrupted, left running by a process that is gone, or failed because its worker died."""
    status = run.info.status
    return status in ("RUNNING", "KILLED") or (status == "FAILED" and bool(run.data.tags.get(LOST_TAG)))


def _environment_change(run: Run, env_tags: dict[str, str]) -> str | None:
    """A checkpoint resumes only under the code, torch and device that wrote it (bit-exactness)."""
    for key in RESUME_TAGS:
        old, new = run.data.tags.get(key), env_tags.get(key)
        if old is not None and old != new:
            return f"{key.removeprefix(PREFIX)} changed ({old} -> {new})"
    return None


def reconcile(
    client: MlflowClient,
    experiment_ids: Iterable[str],
    stale_s: float = DEFAULT_STALE_S,
    artifact_root: str | None = None,
) -> list[str]:
    """Mark RUNNING cell and matrix runs whose owner is gone as KILLED; one note per run.

    A cell run is only marked after winning the next claim generation on it, so a process that
    is taking the cell over at this moment keeps it, and a slow owner is fenced off.
    """
    from mlflow.entities import RunTag

    ids = list(experiment_ids)
    if not ids:
        return []
    notes = []
    owner = Owner.me()
    running = client.search_runs(ids, filter_string="attributes.status = 'RUNNING'", max_results=50000)
    for run in running:
        tags = run.data.tags
        role = tags.get(ROLE_TAG)
        if role not in (CELL, MATRIX):
            continue
        new_tags = {STATUS_TAG: KILLED}
        if role == CELL and tags.get(CELL_ID_TAG):
            cell_id = tags[CELL_ID_TAG]
            claim = current_claim(client, run.info.experiment_id, cell_id)
            if claim is not None:
                why = holder_gone(claim, run, stale_s)
            else:
                why = gone(tags.get(OWNER_TAG), _heartbeat(run), stale_s)
            if why is None:
                continue
            generation = (claim.generation if claim else 0) + 1
            if try_claim(client, run.info.experiment_id, cell_id, generation, owner, artifact_root) is None:
                continue  # someone else is taking it over right now
            new_tags[CLAIM_TAG] = str(generation)
        else:
            why = gone(tags.get(OWNER_TAG), _heartbeat(run), stale_s)
            if why is None:
                continue
        new_tags[REASON_TAG] = f"owner gone: {why}"
        client.log_batch(run.info.run_id, tags=[RunTag(k, v) for k, v in new_tags.items()])
        client.set_terminated(run.info.run_id, "KILLED")
        notes.append(f"{run.info.run_name} ({why})")
    return notes
