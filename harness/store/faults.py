"""Telling the store or the disk failing under a run from a cell's own failure.

A full disk, a store made read-only or deleted, an I/O error: none of these is the cell's fault,
and none is fixed by rerunning the cell afresh. So such an error is not recorded as a FAILED cell
(which would discard its checkpoint) but ends the whole command: one line naming the cause and
what to rerun, exit code ``EXIT_STORE``; what can still be marked is marked KILLED, and the next
``run`` resumes every cell from its last checkpoint, as after a signal.

The cause is read from the exception chain: an ``OSError``'s errno, or the text sqlite puts in
its errors, which MLflow passes on (also through an MLflow server, as the text of a 500).
"""

from __future__ import annotations

import errno

__all__ = ["EXIT_STORE", "StoreLost", "store_fault"]

EXIT_STORE = 3  # distinct from 1 (cells failed) and 2 (bad input): the environment failed mid-run

_ERRNO = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EROFS: "the file system became read-only",
    errno.EIO: "a disk I/O error",
}
# sqlite's messages (sqlite3.OperationalError, wrapped by sqlalchemy and MLflow), lower case.
_TEXT = (
    ("database or disk is full", "the disk is full"),
    ("no space left on device", "the disk is full"),
    ("file write failed", "the disk is full"),  # torch.save's writer on ENOSPC
    ("attempt to write a readonly database", "the store became read-only"),
    ("read-only file system", "the file system became read-only"),
    ("disk i/o error", "a disk I/O error"),
    ("unable to open database file", "the store's file or folder cannot be opened"),
    ("no such table", "the store's file was deleted or replaced"),
    ("database disk image is malformed", "the store's file is corrupt"),
)


class StoreLost(Exception):
    """The store or the disk failed mid-run; ``cause`` in a few words, ``detail`` the error."""

    def __init__(self, cause: str, detail: str) -> None:
        super().__init__(f"{cause} ({detail})")
        self.cause, self.detail = cause, detail

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # crosses process boundaries whole
        return StoreLost, (self.cause, self.detail)


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        stack += [e.__cause__, e.__context__]  # type: ignore[list-item]
    return seen


def store_fault(exc: BaseException) -> StoreLost | None:
    """``exc`` as a ``StoreLost`` when it (or what it wraps) is the store or its disk failing."""
    for e in _chain(exc):
        if isinstance(e, StoreLost):
            return e
        if isinstance(e, OSError) and e.errno in _ERRNO:
            where = f" writing {e.filename}" if e.filename else ""
            return StoreLost(_ERRNO[e.errno], f"{e.strerror}{where}")
        text = str(e).lower()
        for needle, cause in _TEXT:
            if needle in text:
                return StoreLost(cause, f"sqlite: {needle}")
    return None
