"""Per-step time and peak memory of pooled normalisation: all-pairs reference, truncated, per-tuple.

The identity shape ``(n,) -> (n,)``, ``k = n`` continuous tuples, batch 64, the layer's default
samples (``a_l = a_g = 2``, region ``ceil(log2 n)``); one step = forward + backward + Adam. Three
forms: ``reference`` (pooled, all pairs, ``O(b k^2 s)``), ``truncated`` (pooled over the pairs
within the cut-off, the default, ``tail = 1e-6``) and ``tuple`` (per-tuple normalisation). Two
states of the layer:

- ``initial``: a fresh layer (random means, ``sigma_raw = 0``: variance ``0.21 n + 0.1``);
- ``trained``: means on the diagonal (the identity's answer, plus uniform noise of +-0.3) and
  ``sigma_raw = -10`` (variance ``0.1 + 3.4e-5 n``), the sigmas a converged identity run reaches.

Each (form, state, n, threads) runs in a fresh forked child (after ``import torch``), so its peak
resident memory (``ru_maxrss`` above the child's start) is its own; it times a warm-up step, then
at least 3 steps and 1 s (at most 10) and reports its median wall and CPU time. ``--rounds``
rounds run every configuration once each, in a rotated order, and the tables hold the median over
rounds, so a burst of load from other processes hits one sample, not a whole row. A child that
fails (out of memory under ``--mem-limit-gib``, or killed) shows as such; larger n of that
form are skipped. The last table is the large-n per-tuple row: ``n = k = 2^20``, batch 8, forward
+ backward (and the Adam step), wall time and peak memory. ``--chunk`` runs every layer in
checkpointed chunks of tuples (appendix A.2's gradient accumulation): a second forward per step
for memory that no longer grows with ``k``, which is how far the truncated form goes at the
initial sigmas.

    .venv/bin/python benchmarks/bench_pooled.py                  # the full tables (about an hour)
    .venv/bin/python benchmarks/bench_pooled.py --max-log2 9 --rounds 1 --threads 1
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import time
from collections.abc import Iterable
from multiprocessing.connection import Connection
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from estimators.sparse import SparseLayer

FORMS = ("reference", "truncated", "tuple")
STATES = ("initial", "trained")
BATCH = 64


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def build(form: str, state: str, n: int, chunk: int = 0) -> SparseLayer:
    """The layer of one configuration, its parameters set to the state."""
    kwargs: dict[str, Any] = {"normalise": "tuple"}
    if form != "tuple":
        kwargs = {"normalise": "pooled", "pooled": "all_pairs" if form == "reference" else "truncated"}
    layer = SparseLayer((n,), (n,), n, chunk=chunk or None, **kwargs)
    if state == "trained":
        with torch.no_grad():
            k = layer.k
            diag = torch.linspace(0, n - 1, k)[:, None] + (torch.rand(k, 2) - 0.5) * 0.6  # (k, 2)
            share = (diag.clamp(1e-3, n - 1 - 1e-3) / (n - 1)).clamp(1e-6, 1 - 1e-6)
            layer.means_raw.copy_(torch.logit(share))
            layer.sigmas_raw.fill_(-10.0)
    return layer


def measure(form: str, state: str, log2n: int, threads: int, batch: int = BATCH,
            adam: bool = True, chunk: int = 0) -> dict[str, Any]:
    """One configuration in this process: median step time (wall and CPU) and peak memory."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    n = 2**log2n
    record: dict[str, Any] = {}
    # touch every code path once at n = 8, so that the baseline already holds the libraries'
    # lazily loaded code and thread pools and the peak below is the measurement's own data
    tiny = build(form, state, 8)
    tiny(torch.randn(2, 8)).sum().backward()
    base = _peak_mib()
    try:
        layer = build(form, state, n, chunk)
        opt = torch.optim.Adam(layer.parameters(), lr=1e-3)
        x = torch.randn(batch, n)

        def step() -> tuple[float, float]:
            start, cpu = time.perf_counter(), time.process_time()
            loss = (layer(x) - x).square().mean()  # the identity task's loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if adam:
                opt.step()
                if state == "trained":  # keep the state: Adam moves sigmas by ~lr per step
                    with torch.no_grad():
                        layer.sigmas_raw.fill_(-10.0)
            return time.perf_counter() - start, time.process_time() - cpu

        step()  # warm-up, untimed
        times: list[tuple[float, float]] = []
        while len(times) < 10 and (len(times) < 3 or sum(t for t, _ in times) < 1.0):
            times.append(step())
    except RuntimeError as e:  # allocation failures
        record["error"] = "out of memory" if "memory" in str(e).lower() else str(e).splitlines()[0][:60]
        return record
    record["ms"] = 1e3 * statistics.median(t for t, _ in times)
    record["cpu_ms"] = 1e3 * statistics.median(c for _, c in times)
    record["peak_mib"] = _peak_mib() - base
    return record


def _child(conn: Connection, args: tuple, mem_limit: int) -> None:
    if mem_limit:  # fail with a Python error, not the kernel's OOM killer (others share the box)
        resource.setrlimit(resource.RLIMIT_AS, (mem_limit, mem_limit))
    conn.send(measure(*args))
    conn.close()


def run_child(*args: Any, mem_limit_gib: float = 0.0) -> dict[str, Any]:
    """``measure(*args)`` in a fresh forked process."""
    ctx = mp.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    limit = int(mem_limit_gib * 2**30) + _virtual_bytes() if mem_limit_gib else 0
    proc = ctx.Process(target=_child, args=(send, args, limit))
    proc.start()
    send.close()
    try:
        record = receive.recv()
    except EOFError:  # the child died, e.g. killed by the kernel for memory
        record = {"error": "killed"}
    proc.join()
    return record


def _virtual_bytes() -> int:
    """This process's virtual size: a child's address-space limit is counted above it."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _fmt(record: dict[str, Any] | None, key: str, spec: str = ".1f") -> str:
    if record is None:
        return ""
    if "error" in record:
        return record["error"]
    return format(record[key], spec)


def _time(record: dict[str, Any] | None) -> str:
    if record is None or "error" in record:
        return _fmt(record, "ms")
    return f"{record['ms']:.1f} ({record['cpu_ms']:.1f})"


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> str:
    """``a / b`` in wall (CPU) time."""
    if not a or not b or "ms" not in a or "ms" not in b:
        return ""
    return f"{a['ms'] / b['ms']:.1f}x ({a['cpu_ms'] / b['cpu_ms']:.1f}x)"


def _median(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in records if "error" not in r]
    if not ok:
        return next(iter(records))
    return {key: statistics.median(r[key] for r in ok) for key in ok[0]} | {"rounds": len(ok)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-log2", type=int, default=4)
    parser.add_argument("--max-log2", type=int, default=14)
    parser.add_argument("--reference-max-log2", type=int, default=9,
                        help="largest n for the all-pairs reference (2^10 needs ~20 GiB)")
    parser.add_argument("--threads", default="1,2", help="torch CPU threads, e.g. 1,2")
    parser.add_argument("--states", default="initial,trained")
    parser.add_argument("--forms", default=",".join(FORMS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mem-limit-gib", type=float, default=12.0,
                        help="address-space limit per child (0: none)")
    parser.add_argument("--large-log2", type=int, default=20,
                        help="n = k of the large per-tuple row, batch 8 (0: skip it)")
    parser.add_argument("--chunk", type=int, default=0,
                        help="tuples per gradient-accumulation pass (checkpointed), 0: all at once")
    args = parser.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    states = args.states.split(",")
    forms = args.forms.split(",")
    console = Console(width=160)
    console.log(f"load average {os.getloadavg()}, {os.cpu_count()} CPUs, torch {torch.__version__}")

    configs = [
        (form, state, log2n, t)
        for t in threads for state in states for log2n in range(args.min_log2, args.max_log2 + 1)
        for form in forms if form != "reference" or log2n <= args.reference_max_log2
    ]
    samples: dict[tuple, list[dict[str, Any]]] = {c: [] for c in configs}
    failed: dict[tuple, int] = {}  # (form, state, threads) -> smallest log2 n that failed
    for r in range(args.rounds):
        shift = r * len(configs) // max(args.rounds, 1)
        for config in configs[shift:] + configs[:shift]:
            form, state, log2n, t = config
            if log2n > failed.get((form, state, t), log2n):
                continue  # a smaller n of this form already ran out of memory
            record = run_child(*config, BATCH, True, args.chunk, mem_limit_gib=args.mem_limit_gib)
            samples[config].append(record)
            if "error" in record:
                failed[form, state, t] = min(log2n, failed.get((form, state, t), log2n))
            console.log(f"round {r}: {form:9} {state:7} n=2^{log2n:<2} threads={t}: "
                        f"{_fmt(record, 'ms')} ms, {_fmt(record, 'peak_mib', '.0f')} MiB")
    console.log(f"load average {os.getloadavg()}")

    result = {c: _median(s) for c, s in samples.items() if s}
    for t in threads:
        for state in states:
            table = Table(title=f"one step (forward + backward + Adam), identity shape, k = n, batch "
                                f"{BATCH}, {state} sigmas, {t} thread(s)"
                                + (f", chunks of {args.chunk} tuples" if args.chunk else "")
                                + ": median ms, wall (CPU), and peak MiB (RSS over baseline)")
            for col in ("n", *(f"{f} ms" for f in forms), *(f"{f} MiB" for f in forms),
                        "reference / truncated", "truncated / tuple"):
                table.add_column(col, justify="right")
            for log2n in range(args.min_log2, args.max_log2 + 1):
                row = {f: result.get((f, state, log2n, t)) for f in forms}
                table.add_row(
                    f"2^{log2n}", *(_time(row[f]) for f in forms),
                    *(_fmt(row[f], "peak_mib", ".0f") for f in forms),
                    _ratio(row.get("reference"), row.get("truncated")),
                    _ratio(row.get("truncated"), row.get("tuple")),
                )
            console.print(table)

    if args.large_log2:
        table = Table(title=f"per-tuple normalisation at n = k = 2^{args.large_log2}, batch 8")
        for col in ("threads", "step", "ms (wall)", "ms (CPU)", "peak MiB"):
            table.add_column(col, justify="right")
        for t in threads:
            for adam, label in ((False, "forward + backward"), (True, "+ Adam")):
                record = run_child("tuple", "initial", args.large_log2, t, 8, adam,
                                   mem_limit_gib=args.mem_limit_gib)
                table.add_row(str(t), label, _fmt(record, "ms"), _fmt(record, "cpu_ms"),
                              _fmt(record, "peak_mib", ".0f"))
        console.print(table)


if __name__ == "__main__":
    main()
