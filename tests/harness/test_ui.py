"""``sparsebench ui``: a taken or bad address and a missing store are one line and exit 2 at once;
INT, TERM or HUP to its pid stops every process of the dashboard's server; a host beyond
loopback is warned about. Real ``mlflow server`` processes on a real sqlite store."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.cli import main
from harness.store.server import answers, free_port

START_S = 240  # an MLflow server imports its whole app: a minute or more on a busy machine


def _error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    started = time.monotonic()
    assert main(argv) == 2
    assert time.monotonic() - started < 30  # refused before MLflow's server is imported or started
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "70000"], "argument --port: '70000' is not a port: give 1 to 65535"),
        (["--port", "-1"], "argument --port: '-1' is not a port: give 1 to 65535"),
        (["--port", "x"], "argument --port: 'x' is not a port number"),
        (["--host", "no-such-host.invalid"], "--host 'no-such-host.invalid': not an address of this machine"),
        (["--host", "999.1.1.1"], "--host '999.1.1.1': not an address of this machine"),
    ],
)
def test_a_bad_port_or_host_is_one_line(store_home, capsys, args, message):
    assert message in _error(capsys, ["ui", *args])


def test_a_taken_port_is_one_line(store_home, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = _error(capsys, ["ui", "--port", str(port)])
    assert line == (
        f"sparsebench: error: --host 127.0.0.1 --port {port}: cannot listen there (Address already in use)"
    )


def test_a_missing_store_is_refused_as_report_refuses_it(home, capsys, tmp_path):
    line = _error(capsys, ["ui", "--port", str(free_port())])
    assert line == _error(capsys, ["report", "--out", str(tmp_path / "report")])
    db = home / "mlflow.db"
    assert line == f"sparsebench: error: no tracking store at {db}; run `sparsebench run` first"
    assert not home.exists()


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (from /proc: no psutil here)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_int_term_or_hup_to_ui_stops_every_server_process(store_home, tmp_path):
    env = {**os.environ, "SPARSEBENCH_HOME": str(store_home)}
    env.pop("MLFLOW_TRACKING_URI", None)
    trials = {"SIGINT": "127.0.0.1", "SIGTERM": "localhost", "SIGHUP": "0.0.0.0"}
    started = {}
    for name, host in trials.items():
        port = free_port()
        err = (tmp_path / f"{name}.err").open("w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "harness.cli", "ui", "--host", host, "--port", str(port)],
            env=env, stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
        started[name] = (proc, port)
    deadline = time.monotonic() + START_S
    for name, (proc, port) in started.items():
        while not answers(f"http://127.0.0.1:{port}/health"):
            assert proc.poll() is None, (tmp_path / f"{name}.err").read_text()[-2000:]
            assert time.monotonic() < deadline, f"{name}: the dashboard never answered"
            time.sleep(0.2)
    for name, (proc, port) in started.items():
        below = _descendants(proc.pid)
        assert below  # the mlflow server, and the workers it started
        proc.send_signal(getattr(signal, name))
        assert proc.wait(timeout=60) == 0, name
        stop = time.monotonic() + 60
        while any(_alive(pid) for pid in below):
            assert time.monotonic() < stop, f"{name}: {[p for p in below if _alive(p)]} still run"
            time.sleep(0.1)
        with socket.socket() as sock:  # nothing listens there any more
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past the health checks' TIME_WAIT
            sock.bind(("127.0.0.1", port))
    warned = (tmp_path / "SIGHUP.err").read_text().splitlines()
    assert warned[0].startswith("sparsebench: warning: --host 0.0.0.0 serves the dashboard beyond this")
    assert "has no authentication" in warned[0]
    assert "warning" not in (tmp_path / "SIGTERM.err").read_text()  # localhost is loopback
