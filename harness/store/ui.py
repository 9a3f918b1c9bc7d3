"""``sparsebench ui``: the MLflow dashboard server, checked before it starts and stopped whole.

``mlflow server`` takes seconds to import its app before uvicorn finds a port taken, and then
buries the reason in its log; so the address is tried here first (one line, exit 2, at once).
The server and the workers it starts run in their own process group: a signal to ``ui`` (INT,
TERM or HUP: Ctrl-C, ``kill``, a closed terminal) is forwarded to that whole group, and ``ui``
waits for it to go, so no server is left listening behind it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from types import FrameType

from harness.errors import UsageError
from harness.signals import HANDLED

__all__ = ["check_address", "serve"]

STOP_S = 20.0  # how long the server's group gets to exit after SIGTERM before SIGKILL


def check_address(host: str, port: int) -> bool:
    """Raise ``UsageError`` unless a server can listen on ``host:port`` now; whether every
    address ``host`` names is a loopback one (anything else serves other machines)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise UsageError(f"--host {host!r}: not an address of this machine ({reason})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind(address)
        except OSError as e:
            raise UsageError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None
    return all(ipaddress.ip_address(info[4][0].split("%", 1)[0]).is_loopback for info in infos)


def _die_with_parent() -> None:
    from harness.signals import die_with_parent

    die_with_parent()


def serve(command: Sequence[str], env: Mapping[str, str]) -> int:
    """Run the server ``command`` until it exits or ``ui`` gets a signal; 0 when a signal
    stopped it, else the server's exit code."""
    process = subprocess.Popen(
        list(command), env=dict(env), start_new_session=True, preexec_fn=_die_with_parent
    )
    stopped: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        stopped.append(signum)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in HANDLED}
    try:
        code = process.wait()
    finally:
        _stop_group(process)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if stopped else code


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's group (workers may outlive the server itself), then SIGKILL."""
    deadline = time.monotonic() + STOP_S
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(STOP_S)
        while time.monotonic() < deadline:
            os.killpg(process.pid, 0)  # raises once no process of the group is left
            time.sleep(0.1)
        os.killpg(process.pid, signal.SIGKILL)
