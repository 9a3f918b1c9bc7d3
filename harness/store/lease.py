"""The heartbeat that keeps this process's runs alive in the eyes of other processes.

A daemon thread stamps ``sparsebench.heartbeat`` on every run the process holds, every
``HEARTBEAT_S`` seconds, so it keeps beating through a long data build or evaluation. For a cell
it also reads the cell's claim: once a newer generation exists (another process judged this one
gone and took the cell over), ``lost(run_id)`` says so and the training loop stops at its next
step boundary without writing anything more to that run.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from harness.store.claims import HEARTBEAT_S, Claim, current_claim
from reports.schema import HEARTBEAT_TAG

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

__all__ = ["Heartbeat"]


class Heartbeat:
    """``with Heartbeat(client): hb.hold(run_id, claim) ... hb.release(run_id)``."""

    def __init__(self, client: MlflowClient, interval_s: float = HEARTBEAT_S) -> None:
        self.client = client
        self.interval_s = interval_s
        self._held: dict[str, Claim | None] = {}
        self._lost: dict[str, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        self._thread = threading.Thread(target=self._loop, name="sparsebench-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def hold(self, run_id: str, claim: Claim | None = None) -> None:
        """Beat for ``run_id`` from now on (the first beat is written by whoever opened the run)."""
        with self._lock:
            self._held[run_id] = claim
            self._lost.pop(run_id, None)

    def release(self, run_id: str) -> None:
        with self._lock:
            self._held.pop(run_id, None)

    def lost(self, run_id: str) -> str | None:
        """Why this process no longer owns ``run_id`` (its claim was taken over), else ``None``."""
        with self._lock:
            return self._lost.get(run_id)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                held = dict(self._held)
            for run_id, claim in held.items():
                try:
                    self._beat(run_id, claim)
                except Exception:  # a store hiccup: the next beat tries again
                    continue

    def _beat(self, run_id: str, claim: Claim | None) -> None:
        if claim is not None:
            now = current_claim(self.client, claim.experiment_id, claim.cell_id)
            if now is not None and now.generation > claim.generation:
                with self._lock:
                    self._lost[run_id] = f"its claim was taken over by {now.owner}"
                    self._held.pop(run_id, None)
                return
        self.client.set_tag(run_id, HEARTBEAT_TAG, f"{time.time():.3f}")
