"""How long each dataset takes to check and to load, and how large it is on disk and in memory.

For every dataset that is present here (``embedded-mnist`` always; ``fashion-mnist`` from
``--data-root`` or Debian's ``dataset-fashion-mnist``; ``mnist`` from ``--data-root``), each load
runs in a fresh child process, so no memoised copy is reused and the peak resident memory
(``ru_maxrss``, above the child's RSS at its start) belongs to that load alone. The load is timed
in its stages: the header check a run does before anything is written (``check_dataset``), the
read through torchvision (unpacking Debian's gzipped files first), the float conversion and the
provenance sha256 are all inside ``load_digits`` (wall and CPU time: on a busy machine the CPU
time is the fairer figure); ``--repeats`` loads are timed, the median shown.

    .venv/bin/python benchmarks/bench_data_loading.py --data-root ~/data --threads 1
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import time
from multiprocessing.connection import Connection
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from plugins.data.mnist import DataError
from plugins.data.sources import DATASETS, check_dataset, load_digits


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _measure(dataset: str, root: Path | None, threads: int, out: Connection) -> None:
    torch.set_num_threads(threads)
    start_rss = _peak_mib()
    t0 = time.perf_counter()
    files = check_dataset(dataset, root)
    t1, c1 = time.perf_counter(), time.process_time()
    splits = load_digits(dataset, root)
    t2, c2 = time.perf_counter(), time.process_time()
    disk = sum(p.stat().st_size for p in files.folder.iterdir() if p.is_file())
    memory = sum(t.element_size() * t.nelement() for d in (splits.train, splits.test)
                 for t in (d.images, d.labels))
    out.send({
        "check_s": t1 - t0, "load_s": t2 - t1, "load_cpu_s": c2 - c1,
        "train": len(splits.train), "test": len(splits.test),
        "folder": str(files.folder), "disk_mib": disk / 2**20, "tensors_mib": memory / 2**20,
        "peak_mib": _peak_mib() - start_rss,
    })


def measure(dataset: str, root: Path | None, threads: int) -> dict[str, float | str]:
    ctx = mp.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_measure, args=(dataset, root, threads, send))
    child.start()
    result = receive.recv()
    child.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    table = Table(title=f"dataset check and load ({args.threads} thread(s), median of {args.repeats})")
    for column in ("dataset", "folder", "train / test", "folder MiB", "tensors MiB",
                   "peak RSS MiB", "check ms", "load s", "load CPU s"):
        table.add_column(column, justify="left" if column in ("dataset", "folder") else "right")
    for dataset in DATASETS:
        try:
            check_dataset(dataset, args.data_root)
        except DataError as e:
            table.add_row(dataset, f"absent: {str(e)[:60]}...", "", "", "", "", "", "", "")
            continue
        runs = [measure(dataset, args.data_root, args.threads) for _ in range(args.repeats)]
        first = runs[0]
        table.add_row(
            dataset, str(first["folder"]), f"{first['train']:,} / {first['test']:,}",
            f"{first['disk_mib']:.1f}", f"{first['tensors_mib']:.1f}",
            f"{max(r['peak_mib'] for r in runs):.0f}",
            f"{statistics.median(r['check_s'] for r in runs) * 1000:.1f}",
            f"{statistics.median(r['load_s'] for r in runs):.2f}",
            f"{statistics.median(r['load_cpu_s'] for r in runs):.2f}",
        )
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
