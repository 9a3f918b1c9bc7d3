"""A store is born whole or not at all; a half-born one is rebuilt or refused; a foreign sqlite
file is refused untouched (``harness.store.birth``), all on real sqlite files and real MLflow.

The signal trials hook sqlalchemy in a child process: it sends itself TERM, INT or KILL as
MLflow executes its K-th statement of the store's creation, for K early, midway and at the
very end (each signal at two of them), so every phase (tables, migrations, the rename) is hit
without guessing at delays.
``benchmarks/store_birth_trials.py`` runs the same trial through the whole CLI with delays.
"""

from __future__ import annotations

import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from harness.cli import main
from harness.errors import TrackingError
from harness.store.birth import inspect_store
from harness.store.client import open_client

RUN = ["run", "--task", "identity", "--estimator", "dense", "--size", "8", "--set", "tasks.identity.steps=2",
       "--no-progress", "--threads", "1"]  # fmt: skip

# Creates the store at argv[1] under the CLI's signal guard; with argv[2:] = SIGNAL K, sends itself
# SIGNAL as the K-th SQL statement executes. Prints how many statements the creation took.
CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from sqlalchemy import event
    from sqlalchemy.engine import Engine
    from harness.signals import SignalGuard
    from harness.store.client import open_client

    count = [0]
    sig, at = (getattr(signal, sys.argv[2]), int(sys.argv[3])) if len(sys.argv) > 2 else (None, 0)

    @event.listens_for(Engine, "before_cursor_execute")
    def hook(*args):
        count[0] += 1
        if count[0] == at:
            os.kill(os.getpid(), sig)

    with SignalGuard():
        open_client("sqlite:///" + sys.argv[1], create=True)
    print(count[0])
    """
)


def _child(db: Path, *trigger: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CHILD, str(db), *trigger], capture_output=True, text=True, timeout=300
    )


def _usable(db: Path) -> None:
    """What ``report`` (no creation) and ``run`` (creation allowed) do first, then a write."""
    uri = f"sqlite:///{db}"
    if db.exists():
        assert inspect_store(db).kind == "whole"
        open_client(uri, create=False, write=True)
    client = open_client(uri, create=True)
    run = client.create_run(client.create_experiment("after"))
    client.set_terminated(run.info.run_id)
    assert not list(db.parent.glob(".*.creating-*"))  # a killed creator's temporary file is gone


def test_a_signal_at_any_phase_of_creation_leaves_no_store_or_a_whole_one(tmp_path):
    counted = _child(tmp_path / "count" / "mlflow.db")
    assert counted.returncode == 0, counted.stderr
    total = int(counted.stdout.split()[-1])
    assert total > 50  # tables, then dozens of migrations: there are phases to hit
    early, midway, last = 3, total // 2, total - 1  # tables; the migrations; the rename and first read
    trials = [("SIGTERM", early), ("SIGINT", midway), ("SIGKILL", last),
              ("SIGTERM", midway), ("SIGINT", last), ("SIGKILL", early)]  # fmt: skip

    def trial(index: int) -> tuple[str, int, int, Path]:
        sig, at = trials[index]
        db = tmp_path / f"t{index}" / "mlflow.db"
        return sig, at, _child(db, sig, str(at)).returncode, db

    with ThreadPoolExecutor(3) as pool:
        outcomes = list(pool.map(trial, range(len(trials))))
    for sig, at, code, db in outcomes:
        assert code != 0, (sig, at)  # interrupted before the store was whole (TERM/INT: Interrupted)
        assert not db.exists() or inspect_store(db).kind == "whole", (sig, at)
        _usable(db)


def test_a_killed_creation_then_run_and_report_work(tmp_path, monkeypatch, capsys):
    db = tmp_path / "home" / "mlflow.db"
    assert _child(db, "SIGKILL", "40").returncode == -signal.SIGKILL
    assert not db.exists() and list(db.parent.glob(".mlflow.db.creating-*"))  # the half-built file
    monkeypatch.setenv("SPARSEBENCH_HOME", str(db.parent))
    assert main(RUN) == 0
    assert main(["report", "--out", str(tmp_path / "report")]) == 0
    assert inspect_store(db).kind == "whole" and not list(db.parent.glob(".mlflow.db.creating-*"))


def _add_table(db: Path, sql: str) -> None:
    with sqlite3.connect(db) as connection:
        connection.execute(sql)


def test_a_half_built_store_without_runs_is_built_afresh(schema_db, tmp_path, capsys):
    db = tmp_path / "mlflow.db"
    shutil.copy(schema_db, db)
    _add_table(db, "CREATE TABLE _alembic_tmp_datasets (x INTEGER)")  # what main's interrupted creation left
    assert inspect_store(db).kind == "half"
    open_client(f"sqlite:///{db}", create=True).search_experiments()
    assert inspect_store(db).kind == "whole"
    err = capsys.readouterr().err
    assert "left half-created (an interrupted migration left _alembic_tmp_datasets)" in err


def test_a_half_migrated_store_with_runs_is_refused_untouched(schema_db, tmp_path):
    db = tmp_path / "mlflow.db"
    shutil.copy(schema_db, db)
    client = open_client(f"sqlite:///{db}", create=True)
    client.create_run(client.create_experiment("kept"))
    _add_table(db, "CREATE TABLE _alembic_tmp_runs (x INTEGER)")
    before = db.read_bytes()
    with pytest.raises(TrackingError, match=r"is half-migrated .*_alembic_tmp_runs.* holds 1 runs"):
        open_client(f"sqlite:///{db}", create=True)
    assert db.read_bytes() == before


@pytest.mark.parametrize("command", ["run", "report", "ui"])
def test_an_sqlite_file_that_is_not_a_store_is_refused_untouched(home, capsys, command):
    from harness.store.server import free_port

    home.mkdir()
    db = home / "mlflow.db"
    _add_table(db, "CREATE TABLE foo (x INTEGER)")
    before = db.read_bytes()
    capsys.readouterr()
    argv = {"run": RUN, "report": ["report"], "ui": ["ui", "--port", str(free_port())]}[command]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"sparsebench: error: {db} is an sqlite database but not an MLflow tracking store (its "
                   "tables are foo); point --tracking-uri or SPARSEBENCH_HOME elsewhere"]  # fmt: skip
    assert db.read_bytes() == before
