"""What a running matrix shows: live bars on a terminal, plain lines in a log.

On a terminal, the matrix bar and one bar per running cell (name, step, ETA, it/s, latest loss),
however many cells run at once and wherever they run. When stdout is not a terminal (CI, ``nohup``,
a Slurm log), one line per cell start, per evaluation and per end, each with the time of day, so
that a log of a long matrix says what is going on. The runner feeds either view from the events
of whatever backend runs the cells (``harness.backends.base.Event``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from harness.run.cell import CellResult
from reports.schema import FINISHED

__all__ = ["LineView", "LiveView", "MatrixView", "NullView", "make_view"]


class MatrixView(Protocol):
    """The runner's calls; ``key`` names one cell in flight (its run id)."""

    def __enter__(self) -> MatrixView: ...

    def __exit__(self, *exc: object) -> None: ...

    def started(self, key: str, name: str, steps: int, completed: int) -> None: ...

    def advanced(self, key: str, step: int, loss: float, elapsed: float) -> None: ...

    def evaluated(self, key: str, step: int, metrics: dict[str, float], elapsed: float) -> None: ...

    def ended(self, key: str | None, result: CellResult) -> None: ...


@dataclass
class _Cell:
    name: str
    steps: int
    first: int  # the step it started (or resumed) from
    step: int
    elapsed: float = 0.0  # seconds since it started, as its worker measured them
    loss: float | None = None

    def rate(self) -> float:
        return (self.step - self.first) / max(self.elapsed, 1e-9)

    def eta(self) -> str:
        rate = self.rate()
        if rate <= 0:
            return "-:--:--"
        return _clock((self.steps - self.step) / rate)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class NullView:
    """``--no-progress``: nothing until the summary."""

    def __enter__(self) -> NullView:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def started(self, key: str, name: str, steps: int, completed: int) -> None:
        return None

    def advanced(self, key: str, step: int, loss: float, elapsed: float) -> None:
        return None

    def evaluated(self, key: str, step: int, metrics: dict[str, float], elapsed: float) -> None:
        return None

    def ended(self, key: str | None, result: CellResult) -> None:
        return None


class LineView(NullView):
    """One plain line per cell start, evaluation and end."""

    def __init__(self, total: int, write: Callable[[str], None] | None = None) -> None:
        self.total = total
        self.done = 0
        self.cells: dict[str, _Cell] = {}
        self.write = write or (lambda line: print(line, flush=True))

    def _line(self, what: str, text: str) -> None:
        where = f"[{self.done}/{self.total} done, {len(self.cells)} running]"
        self.write(f"{time.strftime('%H:%M:%S')} {what:<5} {text}  {where}")

    def started(self, key: str, name: str, steps: int, completed: int) -> None:
        self.cells[key] = _Cell(name, steps, completed, completed)
        resumed = f" (resumed at step {completed})" if completed else ""
        self._line("start", f"{name}: {steps} steps{resumed}")

    def advanced(self, key: str, step: int, loss: float, elapsed: float) -> None:
        cell = self.cells.get(key)
        if cell is not None:
            cell.step, cell.loss, cell.elapsed = step, loss, elapsed

    def evaluated(self, key: str, step: int, metrics: dict[str, float], elapsed: float) -> None:
        cell = self.cells.get(key)
        if cell is None:
            return
        cell.step, cell.elapsed = step, elapsed
        values = " ".join(f"{k}={v:.4g}" for k, v in list(metrics.items())[:4])
        speed = f"{cell.rate():.1f} it/s, ETA {cell.eta()}" if step > cell.first else "before training"
        self._line("eval", f"{cell.name} step {step}/{cell.steps}: {values} ({speed})")

    def ended(self, key: str | None, result: CellResult) -> None:
        self.cells.pop(key or "", None)
        self.done += 1
        metric = "" if result.metric is None else f", {result.metric:.4g}"
        wall = f" in {result.wall_s:.1f} s" if result.wall_s else ""
        reason = f" ({result.reason})" if result.reason and result.status != FINISHED else ""
        self._line("end", f"{result.cell.name}: {result.status}{metric}{wall}{reason}"[:300])


class LiveView(NullView):
    """Rich bars: the matrix, then one per running cell (ETA, it/s, latest loss)."""

    def __init__(self, total: int) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description}", style="bold"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[rate]}"),
            TextColumn("{task.fields[loss]}"),
        )
        self.matrix = self.progress.add_task("matrix", total=total, rate="", loss="")
        self.cells: dict[str, tuple[int, _Cell]] = {}

    def __enter__(self) -> LiveView:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def started(self, key: str, name: str, steps: int, completed: int) -> None:
        if key in self.cells:
            self.progress.remove_task(self.cells[key][0])
        task = self.progress.add_task(name, total=steps, completed=completed, rate="", loss="")
        self.cells[key] = (task, _Cell(name, steps, completed, completed))

    def advanced(self, key: str, step: int, loss: float, elapsed: float) -> None:
        if key not in self.cells:
            return
        task, cell = self.cells[key]
        cell.step, cell.loss, cell.elapsed = step, loss, elapsed
        self.progress.update(task, completed=step, rate=f"{cell.rate():.1f} it/s", loss=f"loss {loss:.4g}")

    def evaluated(self, key: str, step: int, metrics: dict[str, float], elapsed: float) -> None:
        if key in self.cells:
            self.progress.update(self.cells[key][0], completed=step)

    def ended(self, key: str | None, result: CellResult) -> None:
        if key in self.cells:
            self.progress.remove_task(self.cells.pop(key)[0])
        self.progress.advance(self.matrix)


def make_view(total: int, show: bool) -> MatrixView:
    """Bars on a terminal, lines elsewhere; nothing when ``show`` is off (``--no-progress``)."""
    if not show:
        return NullView()
    return LiveView(total) if sys.stdout.isatty() else LineView(total)
