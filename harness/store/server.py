"""An MLflow tracking server on 127.0.0.1 over a local sqlite store, for as long as a parallel run.

sqlite takes one writer at a time; with several worker processes each holding its own
connection, writes would queue on the database lock and heartbeats could time out. So a run with
more than one worker starts ``mlflow server`` over the store, every process (the launcher too)
logs over HTTP to it, and it is stopped when the run ends, however it ends.

Artifacts do not go through the server (``--no-serve-artifacts``): the experiment's artifact
location is the folder beside the store (``<home>/artifacts``), a local path that every worker on
this machine reaches, so workers write their snapshots and tracebacks there directly, as a serial
run does, and checkpoints stay in ``<home>/checkpoints``. Workers on other machines need a server
of their own that every node reaches (``--tracking-uri http://HOST:PORT``), which then also
carries their checkpoints as artifacts.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from harness.errors import TrackingError
from harness.signals import die_with_parent

__all__ = ["TrackingServer", "answers", "free_port"]

START_S = 180.0  # the server imports MLflow's whole app: seconds when idle, a minute on a busy box
STOP_S = 20.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str) -> bool:
    """Whether ``url`` answers 200 within 2 s (a server's ``/health``)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


class TrackingServer:
    """``with TrackingServer(store_uri, artifact_root, log) as server: ... server.uri``."""

    def __init__(self, store_uri: str, artifact_root: str, log_path: Path) -> None:
        self.store_uri, self.artifact_root, self.log_path = store_uri, artifact_root, log_path
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> TrackingServer:
        self.port = free_port()
        command = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", self.store_uri,
            "--default-artifact-root", self.artifact_root,
            "--no-serve-artifacts",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--workers", "1",
        ]  # fmt: skip
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # its own group: Ctrl-C is the launcher's to handle
                preexec_fn=die_with_parent,
            )
        try:
            self._wait()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + START_S
        while not answers(f"{self.uri}/health"):
            if self.process.poll() is not None:
                tail = " ".join(self.log_path.read_text(errors="replace").split()[-30:])
                raise TrackingError(
                    f"the tracking server for {self.store_uri} exited (code {self.process.returncode}) "
                    f"before it answered: {tail} (log: {self.log_path})"
                )
            if time.monotonic() > deadline:
                raise TrackingError(
                    f"the tracking server for {self.store_uri} did not answer within {START_S:.0f} s "
                    f"(log: {self.log_path})"
                )
            time.sleep(0.2)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(STOP_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def __exit__(self, *exc: object) -> None:
        self.stop()
