"""What the parallel backends buy and cost: the quick matrix's wall time with one worker and with
two (one torch thread each; target: at least 1.7x from 1 to 2 workers on a 2-core CPU), and what
Ray adds to each cell (a matrix of tiny cells through ``--backend ray`` against the same matrix in
one process).

Every run is the real command (``python -m harness.cli run``) in a subprocess, in a fresh
``SPARSEBENCH_HOME`` of its own; the store's schema is created before the clock starts (MLflow's
migrations take seconds and are not what is measured). Wall time is from the command's start to
its exit: interpreter start, plugin discovery, the tracking server a parallel run starts over
sqlite, Ray's start, training, the summary. "cell s" sums the cells' own ``summary/wall_s``:
against the wall time it shows how much the workers slowed each other down.

    PYTHONPATH=. python benchmarks/bench_backends.py                       # both parts, quick preset
    PYTHONPATH=. python benchmarks/bench_backends.py --part jobs --preset quick
    PYTHONPATH=. python benchmarks/bench_backends.py --part ray --ray-cells 20
    PYTHONPATH=. python benchmarks/bench_backends.py --part jobs --task identity --set tasks.identity.steps=20

Measure on a quiet machine: the load average printed first says whether it was.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
TARGET = 1.7  # the target speed-up from 1 to 2 workers on the quick matrix


@dataclass
class Timed:
    label: str
    command: list[str]
    wall_s: float
    cells: int
    cell_s: float
    statuses: dict[str, int]


def _store_ready(home: Path) -> None:
    """Create the store's schema before the clock starts."""
    from harness.store.tracking import Tracker

    Tracker(f"sqlite:///{home / 'mlflow.db'}")


def _recorded(home: Path) -> tuple[int, float, dict[str, int]]:
    """Cell runs in the store, the sum of their own wall times, and their sparsebench statuses."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    runs = [
        run
        for experiment in client.search_experiments()
        if experiment.name.startswith("sparsebench-")
        for run in client.search_runs([experiment.experiment_id], "tags.`sparsebench.role` = 'cell'")
    ]
    statuses: dict[str, int] = {}
    for run in runs:
        status = run.data.tags.get("sparsebench.status", "?")
        statuses[status] = statuses.get(status, 0) + 1
    return len(runs), sum(r.data.metrics.get("summary/wall_s", 0.0) for r in runs), statuses


def timed_run(label: str, args: list[str], console: Console) -> Timed:
    """``sparsebench run ARGS`` in a fresh home, timed from start to exit."""
    command = [sys.executable, "-m", "harness.cli", "run", *args, "--no-progress"]
    with tempfile.TemporaryDirectory(prefix="sb-bench-") as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        _store_ready(home)
        env = {**os.environ, "SPARSEBENCH_HOME": str(home), "PYTHONPATH": str(ROOT)}
        env.pop("MLFLOW_TRACKING_URI", None)
        console.log(f"{label}: sparsebench run {' '.join(args)}")
        start = time.perf_counter()
        done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode not in (0, 1):  # 1: some cell failed, which the table shows
            console.print(done.stdout[-3000:], done.stderr[-3000:], markup=False)
            raise SystemExit(f"{label}: sparsebench run exited with {done.returncode}")
        cells, cell_s, statuses = _recorded(home)
    console.log(f"{label}: {wall:.1f} s, {cells} cells {statuses}")
    return Timed(label, command, wall, cells, cell_s, statuses)


def _statuses(t: Timed) -> str:
    return ", ".join(f"{n} {s}" for s, n in sorted(t.statuses.items()))


def part_jobs(args: argparse.Namespace, console: Console) -> None:
    matrix = ["--preset", args.preset, "--threads", "1", *args.matrix]
    runs = [timed_run(f"--jobs {jobs}", [*matrix, "--jobs", str(jobs)], console) for jobs in (1, 2)]
    one, two = runs
    speedup = one.wall_s / two.wall_s
    table = Table(title=f"{args.preset} matrix, 1 vs 2 worker processes, 1 torch thread each")
    for column in ("workers", "wall s", "cells", "cell s (sum)", "statuses", "speed-up"):
        table.add_column(column, justify="left" if column in ("workers", "statuses") else "right")
    for t in runs:
        ratio = f"{one.wall_s / t.wall_s:.2f}x"
        table.add_row(t.label, f"{t.wall_s:.1f}", str(t.cells), f"{t.cell_s:.1f}", _statuses(t), ratio)
    console.print(table)
    verdict = "meets" if speedup >= TARGET else "misses"
    console.print(f"speed-up 1 -> 2 workers: {speedup:.2f}x ({verdict} the {TARGET}x target)")
    if one.cells != two.cells or one.statuses != two.statuses:
        console.print("[red]the two runs recorded different cells or statuses[/]")


def _tiny(cells: int, steps: int) -> list[str]:
    """A matrix of ``cells`` tiny identity cells (dense, n=4), one per seed."""
    return [
        "--task", "identity", "--estimator", "dense", "--seeds", ",".join(map(str, range(cells))),
        "--set", "tasks.identity.variants=[{n = 4}]",
        "--set", f"tasks.identity.steps={steps}",
        "--set", f"tasks.identity.eval_every={steps}",
        "--set", "tasks.identity.eval_samples=100",
        "--set", "tasks.identity.snapshots=[]",
        "--threads", "1",
    ]  # fmt: skip


def part_ray(args: argparse.Namespace, console: Console) -> None:
    """(ray wall - local wall) / n as the issue asks, and the same split into what a run pays once
    (starting Ray and the tracking server) and what each further cell adds, from a run of 1 cell."""
    n, steps = args.ray_cells, args.ray_steps
    serial = ["--backend", "ray", "--jobs", "1"]  # one cell in flight: overhead, not parallelism
    local = timed_run(f"local, in process, {n} cells", _tiny(n, steps), console)
    ray = timed_run(f"ray, 1 in flight, {n} cells", [*_tiny(n, steps), *serial], console)
    wide = timed_run(f"ray, all CPUs, {n} cells", [*_tiny(n, steps), "--backend", "ray"], console)
    local_1 = timed_run("local, in process, 1 cell", _tiny(1, steps), console)
    ray_1 = timed_run("ray, 1 in flight, 1 cell", [*_tiny(1, steps), *serial], console)
    table = Table(title=f"Ray's overhead: tiny cells (identity n=4, dense, {steps} steps, 1 thread)")
    for column in ("backend", "wall s", "cells", "cell s (sum)", "statuses", "(ray - local) / cells"):
        table.add_column(column, justify="left" if column in ("backend", "statuses") else "right")
    for t, base in ((local, None), (ray, local), (wide, local), (local_1, None), (ray_1, local_1)):
        overhead = "" if base is None else f"{(t.wall_s - base.wall_s) / t.cells:.3f}" if t.cells else "?"
        table.add_row(t.label, f"{t.wall_s:.1f}", str(t.cells), f"{t.cell_s:.1f}", _statuses(t), overhead)
    console.print(table)
    per_cell = (ray.wall_s - local.wall_s) / n
    marginal = ((ray.wall_s - ray_1.wall_s) - (local.wall_s - local_1.wall_s)) / max(n - 1, 1)
    once = (ray_1.wall_s - local_1.wall_s) - marginal
    console.print(
        f"Ray's overhead per cell (one in flight, {n} cells): {per_cell:.3f} s = "
        f"(ray wall - local wall) / {n}; of which once per run (Ray and tracking-server start): "
        f"{once:.1f} s, each further cell: {marginal:.3f} s"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("jobs", "ray", "all"), default="all")
    parser.add_argument("--preset", default="quick", help="the matrix of the jobs part (default quick)")
    parser.add_argument("--task", action="append", default=[], help="jobs part: only these tasks")
    parser.add_argument("--estimator", action="append", default=[], help="jobs part: only these estimators")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="jobs part: a config override, as for sparsebench run (repeatable)")
    parser.add_argument("--ray-cells", type=int, default=20, help="cells in the Ray part (default 20)")
    parser.add_argument("--ray-steps", type=int, default=20, help="training steps per Ray-part cell")
    args = parser.parse_args(argv)
    args.matrix = [
        *(a for task in args.task for a in ("--task", task)),
        *(a for est in args.estimator for a in ("--estimator", est)),
        *(a for s in args.sets for a in ("--set", s)),
    ]

    console = Console(width=140)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    try:
        import ray

        ray_version = ray.__version__
    except ImportError:
        ray_version = "absent"
    console.print(
        f"load average {load}; {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable); "
        f"torch {torch.__version__}; ray {ray_version}; "
        f"Python {platform.python_version()} on {platform.machine()}"
    )
    if args.part in ("jobs", "all"):
        part_jobs(args, console)
    if args.part in ("ray", "all"):
        if ray_version == "absent":
            raise SystemExit("the ray part needs Ray: pip install 'sparsebench[ray]'")
        part_ray(args, console)


if __name__ == "__main__":
    main()
