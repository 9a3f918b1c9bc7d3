"""The progress views fed the events of several cells at once: the live view keeps a bar per
running cell (step, rate, loss; rich's ETA column) under the matrix bar; the line view writes a
line per start, evaluation (with rate and ETA) and end. End to end through each backend (stdout
not a terminal): tests/harness/test_backends.py."""

from __future__ import annotations

from harness.matrix import Cell
from harness.run.cell import CellResult
from harness.run.progress import LineView, LiveView, NullView, make_view


def _cell(name: str) -> Cell:
    task, variant, estimator, seed = name.split("/")
    return Cell(task, variant, estimator, int(seed.removeprefix("seed=")), {"steps": 100}, {})


A, B = "identity/n=4/dense/seed=0", "identity/n=4/sparse/seed=0"


def test_live_view_shows_every_running_cell_under_the_matrix_bar():
    view = LiveView(total=3)  # not started: no terminal needed to read its bars
    view.started("a", A, 100, 0)
    view.started("b", B, 100, 40)  # resumed at step 40
    view.advanced("a", 10, 0.5, 2.0)
    view.advanced("b", 50, 0.25, 1.0)
    bars = {t.description: t for t in view.progress.tasks}
    assert set(bars) == {"matrix", A, B}
    assert (bars[A].completed, bars[A].fields["rate"], bars[A].fields["loss"]) == (10, "5.0 it/s", "loss 0.5")
    assert (bars[B].completed, bars[B].fields["rate"]) == (50, "10.0 it/s")  # steps since it resumed
    assert bars[A].total == 100 and bars[A].remaining == 90  # what rich's ETA column works from
    view.ended("a", CellResult(_cell(A), "finished", 0.1, 3.0))
    view.ended(None, CellResult(_cell(B), "n/a"))  # a cell that never started moves the matrix on too
    bars = {t.description: t for t in view.progress.tasks}
    assert set(bars) == {"matrix", B} and bars["matrix"].completed == 2


def test_line_view_writes_a_line_per_start_evaluation_and_end():
    lines: list[str] = []
    view = LineView(total=2, write=lines.append)
    view.started("a", A, 100, 0)
    view.started("b", B, 100, 0)
    view.evaluated("a", 0, {"eval/mse": 1.0}, 0.0)
    view.evaluated("a", 50, {"eval/mse": 0.25}, 10.0)
    view.ended("a", CellResult(_cell(A), "failed", None, 12.0, "boom"))
    assert [line.split(" ", 2)[1:] for line in lines] == [
        ["start", f"{A}: 100 steps  [0/2 done, 1 running]"],
        ["start", f"{B}: 100 steps  [0/2 done, 2 running]"],
        ["eval", f" {A} step 0/100: eval/mse=1 (before training)  [0/2 done, 2 running]"],
        ["eval", f" {A} step 50/100: eval/mse=0.25 (5.0 it/s, ETA 0:00:10)  [0/2 done, 2 running]"],
        ["end", f"  {A}: failed in 12.0 s (boom)  [1/2 done, 1 running]"],
    ]


def test_no_terminal_means_lines_and_no_progress_means_nothing(capsys):
    assert isinstance(make_view(3, show=True), LineView)  # pytest's stdout is not a terminal
    assert isinstance(make_view(3, show=False), NullView)
