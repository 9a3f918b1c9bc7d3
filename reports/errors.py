"""What the report raises when it cannot be drawn; ``sparsebench report`` turns each into one line
and exit code 2. Defined here, not in ``harness``, so that the report depends on the store alone."""

from __future__ import annotations

__all__ = ["ReportError", "StoreReadError"]


class ReportError(Exception):
    """No report from this store: it is absent, holds no cells, or lacks the named experiments."""


class StoreReadError(ReportError):
    """The store exists but cannot be read (a broken database, a server error)."""
