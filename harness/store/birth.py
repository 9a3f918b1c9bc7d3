"""A local sqlite store is born whole or not at all, and a file that is not one is left alone.

MLflow creates its tables and then runs some forty alembic migrations on the first open of an
empty database: seconds of work during which a Ctrl-C, a SIGTERM or a SIGKILL left a half-built
store (``table _alembic_tmp_datasets already exists`` on every later open). So a new store is
built in a temporary file beside the final one and renamed into place once MLflow has finished
with it; an interruption leaves no store (a leftover temporary file is removed by the next
creator, which holds ``harness.store.schema_lock``).

An existing file is inspected read-only before MLflow sees it: an MLflow store at the schema
this MLflow expects opens as it is; a half-built one (leftover ``_alembic_tmp_*`` tables, a
schema short of the head) that holds no runs is rebuilt, one that holds runs is refused; an
sqlite database with none of MLflow's tables is refused, byte for byte untouched.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path

from harness.errors import TrackingError

__all__ = ["StoreState", "ensure_store", "inspect_store"]

ALEMBIC_TMP = "_alembic_tmp_"
# Tables that only MLflow (or its alembic bookkeeping) creates; a database with none is not a store.
MLFLOW_TABLES = frozenset({"alembic_version", "experiments", "runs", "metrics", "params", "tags"})
CREATING = ".creating-"  # .<name>.creating-<pid>: a store being built


@dataclass(frozen=True)
class StoreState:
    """What a sqlite file holds: ``absent`` (no file, an empty file or no tables), ``whole``,
    ``half`` (an interrupted creation or migration; ``why`` says what is wrong) or ``foreign``."""

    kind: str
    why: str = ""
    runs: int = 0


def _head_revision() -> str | None:
    try:
        from mlflow.store.db.utils import _get_latest_schema_revision

        return _get_latest_schema_revision()
    except Exception:  # noqa: BLE001 - an MLflow without it: the revision is not checked
        return None


def inspect_store(path: Path) -> StoreState:
    """The state of the sqlite file at ``path``, read without writing a byte."""
    if not path.exists() or path.stat().st_size == 0:
        return StoreState("absent")
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as e:
        raise TrackingError(f"tracking store {path} cannot be read: {e}") from None
    try:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            return StoreState("absent")
        if not tables & MLFLOW_TABLES:
            return StoreState("foreign", f"its tables are {', '.join(sorted(tables)[:5])}")
        runs = db.execute("SELECT count(*) FROM runs").fetchone()[0] if "runs" in tables else 0
        leftovers = sorted(t for t in tables if t.startswith(ALEMBIC_TMP))
        if leftovers:
            return StoreState("half", f"an interrupted migration left {', '.join(leftovers)}", runs)
        if "alembic_version" not in tables:
            return StoreState("half", "its schema was created but never migrated", runs)
        row = db.execute("SELECT version_num FROM alembic_version").fetchone()
        head = _head_revision()
        if row is None or (head is not None and row[0] != head):
            found = row[0] if row else "none"
            return StoreState("half", f"its schema is at revision {found}, MLflow expects {head}", runs)
        return StoreState("whole", runs=runs)
    except sqlite3.DatabaseError as e:
        raise TrackingError(f"tracking store {path} is not a readable sqlite database ({e})") from None
    finally:
        db.close()


def ensure_store(path: Path, *, create: bool) -> None:
    """Leave a whole MLflow store at ``path`` or raise ``TrackingError`` without touching the file.

    ``create``: build one where there is none, or where an interrupted creation left one with no
    runs. Call it holding ``harness.store.schema_lock(path)``: no one else is building here.
    """
    _remove_leftovers(path)
    state = inspect_store(path)
    if state.kind == "whole":
        return
    if state.kind == "foreign":
        raise TrackingError(
            f"{path} is an sqlite database but not an MLflow tracking store ({state.why}); "
            "point --tracking-uri or SPARSEBENCH_HOME elsewhere"
        )
    if state.kind == "half" and state.runs:
        raise TrackingError(
            f"tracking store {path} is half-migrated ({state.why}) and holds {state.runs} runs; back it "
            f"up, then run `mlflow db upgrade sqlite:///{path}` or move it aside"
        )
    if not create:
        what = "is empty" if state.kind == "absent" else f"was never finished ({state.why})"
        raise TrackingError(f"tracking store {path} {what}; run `sparsebench run` first")
    if state.kind == "half":
        print(
            f"sparsebench: warning: tracking store {path} was left half-created ({state.why}) and "
            "holds no runs; building it afresh",
            file=sys.stderr,
        )
    build_store(path)


def build_store(path: Path) -> None:
    """Create and migrate an MLflow store in a temporary file, then rename it to ``path``."""
    tmp = path.with_name(f".{path.name}{CREATING}{os.getpid()}")
    uri = f"sqlite:///{tmp}"
    try:
        _migrate(uri)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the file's pages are on disk before the rename makes it the store
        os.replace(tmp, path)
    except BaseException:
        _unlink_building(tmp)
        raise
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _migrate(uri: str) -> None:
    """MLflow's own first open of ``uri`` (tables, migrations, the Default experiment), then its
    connections closed: the file is renamed next, and nothing may write to it under its old name."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as e:  # sqlalchemy or MLflow errors: a disk full, a folder gone
        detail = " ".join(str(e).split())[:300]
        raise TrackingError(f"cannot create the tracking store: {type(e).__name__}: {detail}") from None
    finally:
        engine = getattr(SqlAlchemyStore, "_engine_map", {}).pop(uri, None)  # MLflow's engine cache
        if engine is not None:
            engine.dispose()


def _unlink_building(tmp: Path) -> None:
    for leftover in (tmp, tmp.with_name(tmp.name + "-journal"), tmp.with_name(tmp.name + "-wal")):
        with contextlib.suppress(OSError):
            leftover.unlink()


def _remove_leftovers(path: Path) -> None:
    """Temporary stores of creators that were killed (SIGKILL runs no cleanup)."""
    with contextlib.suppress(OSError):
        for leftover in path.parent.glob(f".{path.name}{CREATING}*"):
            leftover.unlink()
