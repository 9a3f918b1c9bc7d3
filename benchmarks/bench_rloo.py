"""Per-step cost of several samples per instance: ``rloo`` at S = 2, 4, 16 against ``reinforce``
at S = 1 (the cell as the matrix runs it) and with its layer set to S samples, on identity n = 16
and sorting n = 4 (the paper's key network, 3-digit numbers, batch 64; the embedded digits, so no
download is needed; the network's cost is the same).

A step is what the training loop does: ``train_step`` (the task's forward, S rows per instance
through the layer and after it), backward and the Adam step, timed over ``--*-steps`` steps after
a warm-up; the median of ``--repeats`` such timings, the configurations taking turns. The ratio is
to reinforce at S = 1.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_rloo.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from harness.matrix import choose_kind
from harness.plugins import Registry, load
from harness.run.loop import Loop
from harness.task import CellSetup

TASKS: dict[str, dict[str, Any]] = {
    "identity": {"n": 16},
    "sorting": {"n": 4, "dataset": "embedded-mnist"},
}
CONFIGS = [("reinforce", 1), ("reinforce", 4), ("reinforce", 16), ("rloo", 2), ("rloo", 4), ("rloo", 16)]


def _loop(registry: Registry, task_name: str, estimator: str, samples: int, steps: int,
          cache: Path) -> Loop:
    """One cell's training loop on the CPU, warmed up by ``steps`` steps; no evaluation falls due."""
    task, est = registry.task(task_name), registry.estimator(estimator)
    params = dict(task.check_data({**task.defaults, **TASKS[task_name]}, allow_embedded=True))
    params.update(steps=10**9, eval_every=10**9, snapshots=[])
    est_params = {**est.defaults, **({"samples": samples} if estimator == "rloo" else {})}
    kind, spec, reason = choose_kind(task, est, params, est_params)
    if kind is None:
        raise SystemExit(f"{estimator} cannot serve {task_name}: {reason}")
    torch.manual_seed(0)
    layer = est.build(spec, est_params)
    layer.samples = samples  # reinforce: S rows per instance through the contract
    run = task.setup(CellSetup(params, layer, kind, torch.device("cpu"), 0, cache, spec))
    loop = Loop(run, params["lr"])
    loop.train(stop=steps, evaluate_first=False)
    return loop


def step_seconds(registry: Registry, task_name: str, steps: int, repeats: int) -> list[float]:
    """Median seconds per training step of every ``CONFIGS`` entry; the configurations take turns
    within each repeat, so that a change of machine load meets all of them alike."""
    with tempfile.TemporaryDirectory() as cache:
        loops = [_loop(registry, task_name, e, s, steps, Path(cache)) for e, s in CONFIGS]
        times: list[list[float]] = [[] for _ in CONFIGS]
        for _ in range(repeats):
            for loop, timed in zip(loops, times, strict=True):
                start = time.perf_counter()
                loop.train(stop=loop.step + steps, evaluate_first=False)
                timed.append((time.perf_counter() - start) / steps)
    return [statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--identity-steps", type=int, default=100)
    parser.add_argument("--sorting-steps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    registry = load()
    console = Console()
    for task_name in TASKS:
        steps = args.identity_steps if task_name == "identity" else args.sorting_steps
        table = Table(title=f"{task_name} {TASKS[task_name]}: seconds per step, "
                            f"{args.threads} thread(s), median of {args.repeats} x {steps} steps")
        for column in ("estimator", "S", "ms / step", "ratio to reinforce S=1"):
            table.add_column(column, justify="right")
        measured = step_seconds(registry, task_name, steps, args.repeats)
        for (estimator, samples), seconds in zip(CONFIGS, measured, strict=True):
            table.add_row(estimator, str(samples), f"{1000 * seconds:.2f}",
                          f"{seconds / measured[0]:.2f}")
        console.print(table)


if __name__ == "__main__":
    main()
