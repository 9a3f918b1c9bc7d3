"""SIGINT, SIGTERM and SIGHUP handled alike: what Ctrl-C, ``timeout``, Slurm and Kubernetes send.

Inside ``guard.deferred()`` (one training step, a claim, a run's final status) a signal is only
recorded; the training loop acts on it at its next step boundary (checkpoint, then raise), and
other deferred sections raise on leaving through ``guard.atomic()``. Anywhere else the handler
raises ``Interrupted`` at once. A second signal while one is pending raises at once too: a user
who presses Ctrl-C twice does not want to wait for the step to end.

A worker process (``harness.backends.pool``, ``harness.backends.ray_backend``) enters its guard with
``escalate=False``: its launcher forwards the user's signal once, and Slurm or a shell may deliver
the same one to the worker as well; two copies of one request must not cut the step short. The
launcher escalates instead (a second Ctrl-C there kills its workers at once).

``die_with_parent`` is the other half of a clean exit: a child process (a pool worker, the tracking
server) asks Linux to signal it when its launcher dies, so a launcher killed outright leaves no orphans.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import threading
from collections.abc import Iterator
from types import FrameType

__all__ = ["HANDLED", "Interrupted", "SignalGuard", "die_with_parent"]

PR_SET_PDEATHSIG = 1
HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """A handled signal; a ``KeyboardInterrupt`` so every Ctrl-C path serves SIGTERM and SIGHUP.

    ``note`` says what was saved (set by the runner); the CLI exits with ``exit_code``.
    """

    def __init__(self, signum: int = signal.SIGINT, note: str = "") -> None:
        super().__init__(signum)
        self.signum = signum
        self.note = note

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class SignalGuard:
    """Installs the handlers on ``__enter__`` (main thread only) and restores them on exit.

    A guard that was never entered works as a no-op, so library code can take one always.
    """

    def __init__(self, signals: tuple[int, ...] = HANDLED, escalate: bool = True) -> None:
        self.signum: int | None = None
        self.signals = signals
        self.escalate = escalate
        self._defer = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> SignalGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = self.signum is None
        if first or self.escalate:
            self.signum = signum
        if self._defer == 0 or (self.escalate and not first):
            raise Interrupted(self.signum)

    @property
    def pending(self) -> int | None:
        """The signal received inside a deferred section and not yet acted on."""
        return self.signum

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Signals are recorded, not raised, until the caller checks ``pending``."""
        self._defer += 1
        try:
            yield
        finally:
            self._defer -= 1

    @contextlib.contextmanager
    def atomic(self) -> Iterator[None]:
        """Deferred, then a pending signal is raised on leaving (if nothing else is raising)."""
        with self.deferred():
            yield
        self.raise_pending()

    def raise_pending(self) -> None:
        if self.signum is not None and self._defer == 0:
            raise Interrupted(self.signum)


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Ask Linux to send ``signum`` to this process when its parent exits (no-op elsewhere)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
    except (OSError, AttributeError):
        return
