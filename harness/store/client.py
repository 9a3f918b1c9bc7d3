"""Open an MLflow tracking store the way every command needs it: checked, quiet, and safe when
several processes open a fresh store at once.

Supported stores are the ones whose backend keeps experiment names unique in a database (the
primitive ``harness.store.claims`` builds on): ``sqlite:///path``, a SQL database URI (``postgresql://``,
``mysql://``, ``mssql://``) and an MLflow server (``http(s)://``) in front of one. Anything else is
refused with one line, before anything is written.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from harness.errors import TrackingError
from harness.store.birth import ensure_store

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

__all__ = ["HEALTH_TIMEOUT_S", "open_client", "quiet_mlflow", "sqlite_path"]

HEALTH_TIMEOUT_S = 5  # an MLflow server that does not answer /health within this is unreachable
SQL_SCHEMES = ("postgresql", "mysql", "mssql")
SQLITE_MAGIC = b"SQLite format 3\x00"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, else ``None``."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0])


def quiet_mlflow() -> None:
    """MLflow and alembic announce schema creation and migrations at INFO on stderr; the CLI's
    output is its own, so only their warnings get through (and no run URLs on stdout)."""
    # Over HTTP, MLflow prints a "View run ... at: URL" line on stdout as each run ends; the
    # summary says where the runs are.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    import mlflow  # noqa: F401  (its import configures its loggers; ours must come after)

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # MLflow logs every database error with its traceback before raising it; the error reaches
    # the caller anyway (a store that fails mid-run is one line, ``harness.store.faults``). urllib3
    # warns on each retry of a request to a server that answers 500.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


def open_client(uri: str, *, create: bool, write: bool = True) -> MlflowClient:
    """A client for ``uri`` whose store has been reached and read once.

    ``create``: a local sqlite store may be created (``run``); otherwise it must already exist
    (``report``). ``write``: a local store must be writable. Every problem is a
    ``TrackingError`` naming the store and what to do.
    """
    scheme = urlsplit(uri).scheme.split("+", 1)[0]
    path = sqlite_path(uri)
    if scheme == "sqlite" and path is not None:
        _check_sqlite(path, create, write)  # before MLflow's seconds of imports: a missing store at once
    quiet_mlflow()
    if scheme in ("http", "https"):
        _check_server(uri)
        return _read_once(uri)
    if scheme == "sqlite":
        if path is None:
            raise TrackingError(f"tracking URI {uri!r}: write a sqlite store as sqlite:///path/to/mlflow.db")
        with schema_lock(path):  # the first process creates the store; the others wait for it
            ensure_store(path, create=create)  # whole, or built whole; never half, never foreign
            return _read_once(uri)
    if scheme in SQL_SCHEMES:
        return _read_once(uri)
    raise TrackingError(
        f"tracking URI {uri!r}: unsupported store; use sqlite:///path/to/mlflow.db, a "
        f"{'/'.join(SQL_SCHEMES)} database URI, or http(s)://host:port (an MLflow server)"
    )


def _check_server(uri: str) -> None:
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=HEALTH_TIMEOUT_S) as response:
            if response.status != 200:
                raise TrackingError(f"tracking server {uri} answered {response.status} on /health")
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise TrackingError(
            f"tracking server {uri} is unreachable ({reason}); start it or drop --tracking-uri"
        ) from None


def _check_sqlite(path: Path, create: bool, write: bool) -> None:
    if path.is_dir():
        raise TrackingError(f"tracking store {path} is a folder, not an sqlite database file")
    if not path.exists():
        if not create:
            raise TrackingError(f"no tracking store at {path}; run `sparsebench run` first")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrackingError(
                f"cannot create the tracking store's folder {path.parent}: {e.strerror}"
            ) from None
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise TrackingError(f"cannot create the tracking store {path}: {path.parent} is not writable")
        return
    if not os.access(path, os.R_OK):
        raise TrackingError(f"tracking store {path} is not readable (permission denied)")
    with path.open("rb") as f:
        head = f.read(len(SQLITE_MAGIC))
    if head and head != SQLITE_MAGIC:
        raise TrackingError(
            f"tracking store {path} is not an sqlite database (corrupt or another file); "
            "move it aside or point --tracking-uri at another store"
        )
    # sqlite writes a journal beside the database, so the folder must be writable too.
    if write and not (os.access(path, os.W_OK) and os.access(path.parent, os.W_OK | os.X_OK)):
        raise TrackingError(
            f"tracking store {path} is read-only (it and its folder must be writable to record runs)"
        )


@contextlib.contextmanager
def schema_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` beside the database while a store is inspected or built.

    Two processes that open a fresh store at once would otherwise both build it
    (``harness.store.birth``). Read-only stores (nothing to create) skip it.
    """
    lock = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        yield  # a read-only folder: the store exists already and is not migrated here
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _read_once(uri: str) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)
    except TrackingError:
        raise
    except Exception as e:  # MlflowException, sqlalchemy errors, a KeyError for an odd scheme
        detail = " ".join(str(e).split())[:300]
        raise TrackingError(f"cannot open tracking store {uri}: {type(e).__name__}: {detail}") from None
    return client
