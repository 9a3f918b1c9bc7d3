"""Forward+backward time and peak memory of the sampled sparse layer against a dense n x n layer.

The identity-task shape: ``(n,) -> (n,)`` with ``k = n`` continuous tuples, ``n = 2^4 .. 2^max``,
batch 64 up to ``n = 2^14`` and 8 beyond. Each (layer, n) runs in a fresh child process (forked on
CPU, after ``import torch``, so no child pays for the import), so the peak resident memory
(``ru_maxrss``) belongs to that measurement alone; the table reports it above the child's RSS at
its start. On CUDA the peak is ``torch.cuda.max_memory_allocated``.
The dense layer is skipped once its ``n*n*4``-byte weight exceeds ``--dense-limit-gib`` (or when
allocating it fails); pooled normalisation (its default, truncated form) runs up to
``--pooled-max-log2``. ``bench_pooled.py`` sets the pooled forms and per-tuple normalisation side
by side, with the optimiser step and trained-like sigmas.

    .venv/bin/python benchmarks/bench_sparse_layer.py --max-log2 20
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import time
from multiprocessing.connection import Connection
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from estimators.base import SparseMatrixSpec
from estimators.plugins.dense import DenseMatrixLayer
from estimators.plugins.sparse import SparseMatrixLayer


def batch_for(log2n: int) -> int:
    return 64 if log2n <= 14 else 8


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def child(kind: str, log2n: int, device_name: str, threads: int) -> dict[str, Any]:
    """Measure one (layer, n) in this process and return one flat record."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = torch.device(device_name)
    cuda = device.type == "cuda"
    n, b = 2**log2n, batch_for(log2n)
    record: dict[str, Any] = {"kind": kind, "log2n": log2n, "batch": b}

    def build(size: int) -> torch.nn.Module:
        spec = SparseMatrixSpec(in_shape=(size,), out_shape=(size,), k=size)
        if kind == "dense":
            return DenseMatrixLayer(spec).to(device)
        return SparseMatrixLayer(spec, normalise="pooled" if kind == "pooled" else "tuple").to(
            device
        )

    # touch every code path once at n = 4, so that the baseline already holds the libraries'
    # lazily loaded code and thread pools and the peak below is the measurement's own data
    tiny = build(4)
    tiny(torch.randn(2, 4, device=device)).sum().backward()
    base = _peak_mib()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    try:
        layer = build(n)
        if kind != "dense":
            record["samples"] = layer.sparse.samples
        x = torch.randn(b, n, device=device)

        def step() -> float:
            layer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            y = layer(x)
            ((y - x) ** 2).mean().backward()  # the identity task's loss
            if cuda:
                torch.cuda.synchronize(device)
            return time.perf_counter() - start

        first = step()  # warm-up, untimed
        times: list[float] = []
        while len(times) < 5 and (len(times) < 1 or sum(times) + first < 1.0):
            times.append(step())
    except RuntimeError as e:  # allocation failures (CPU or CUDA out of memory)
        record["error"] = str(e).splitlines()[0][:80]
        return record
    record["ms"] = 1e3 * statistics.median(times)
    record["reps"] = len(times)
    if cuda:
        record["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        record["peak_mib"] = _peak_mib() - base
    return record


def _measure(conn: Connection, kind: str, log2n: int, device: str, threads: int) -> None:
    conn.send(child(kind, log2n, device, threads))
    conn.close()


def run_child(kind: str, log2n: int, device: str, threads: int) -> dict[str, Any]:
    """``child`` in a fresh process: forked on CPU; spawned on CUDA, which cannot be forked."""
    ctx = mp.get_context("spawn" if device.startswith("cuda") else "fork")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_measure, args=(send, kind, log2n, device, threads))
    proc.start()
    send.close()
    try:
        record = receive.recv()
    except EOFError:  # the child died, e.g. killed by the kernel for memory
        proc.join()
        record = {"kind": kind, "log2n": log2n, "error": f"child died (exit {proc.exitcode})"}
    proc.join()
    return record


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-log2", type=int, default=4)
    parser.add_argument("--max-log2", type=int, default=20)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per run")
    parser.add_argument("--dense-limit-gib", type=float, default=1.0,
                        help="skip the dense layer once its n*n*4-byte weight exceeds this")
    parser.add_argument("--pooled-max-log2", type=int, default=10,
                        help="largest n for pooled normalisation (truncated form)")
    args = parser.parse_args(argv)

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    console = Console(width=150)
    rows = []
    for log2n in range(args.min_log2, args.max_log2 + 1):
        n = 2**log2n
        results = {"sparse": run_child("sparse", log2n, device, args.threads)}
        if n * n * 4 <= args.dense_limit_gib * 2**30:
            results["dense"] = run_child("dense", log2n, device, args.threads)
        if log2n <= args.pooled_max_log2:
            results["pooled"] = run_child("pooled", log2n, device, args.threads)
        console.log(f"n=2^{log2n}: " + ", ".join(
            f"{kind} {_fmt(r.get('ms'))} ms" for kind, r in results.items()
        ))
        rows.append((log2n, results))

    mem = "peak MiB (CUDA allocated)" if device == "cuda" else "peak MiB (RSS over baseline)"
    table = Table(title=f"forward+backward per batch, identity shape (n,)->(n,), k=n, on {device}"
                        f", {args.threads} thread(s); memory: {mem}")
    for col in ("n", "batch", "s", "sparse ms", "sparse MiB", "ns/(b*k)", "dense ms",
                "dense MiB", "dense/sparse time", "dense/sparse mem", "pooled ms", "pooled MiB"):
        table.add_column(col, justify="right")
    for log2n, res in rows:
        sp, de, po = res["sparse"], res.get("dense", {}), res.get("pooled", {})
        per = sp["ms"] * 1e6 / (sp["batch"] * 2**log2n) if "ms" in sp else None
        t_ratio = de["ms"] / sp["ms"] if "ms" in de and "ms" in sp else None
        m_ratio = (de["peak_mib"] / sp["peak_mib"]
                   if "ms" in de and "ms" in sp and sp["peak_mib"] > 0 else None)
        table.add_row(
            f"2^{log2n}", str(batch_for(log2n)), str(sp.get("samples", "-")),
            _fmt(sp.get("ms")) if "error" not in sp else sp["error"], _fmt(sp.get("peak_mib")),
            _fmt(per, ".0f"), de.get("error") or _fmt(de.get("ms")), _fmt(de.get("peak_mib")),
            _fmt(t_ratio, ".2f"), _fmt(m_ratio, ".2f"),
            po.get("error") or _fmt(po.get("ms")), _fmt(po.get("peak_mib")),
        )
    console.print(table)


if __name__ == "__main__":
    main()
