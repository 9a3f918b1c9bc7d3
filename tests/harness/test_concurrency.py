"""Several ``sparsebench run`` processes on one sqlite store: the fresh store's schema is created
once, every cell runs exactly once, and nothing but our own lines reaches stderr."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

from harness.store.claims import Owner, current_claim, try_claim

COMMON = [
    "run", "--task", "identity",
    "--set", "tasks.identity.variants=[{n = 4}]",
    "--set", "tuning.trials=0",  # one cell per configuration, no tuning trials
    "--set", "tasks.identity.steps=40",
    "--set", "tasks.identity.eval_every=20",
    "--set", "tasks.identity.eval_samples=200",
    "--set", "tasks.identity.snapshots=[]",
    "--threads", "1", "--no-progress",
]
MATRICES = (  # overlapping selections: 6 distinct cells (3 estimators x 2 seeds), 14 requests
    ["--estimator", "dense,sparse", "--seeds", "0,1"],
    ["--estimator", "sparse,gumbel_sinkhorn", "--seeds", "0,1"],
    ["--estimator", "dense,sparse,gumbel_sinkhorn", "--seeds", "1,0"],
)


def test_concurrent_runs_on_a_fresh_store_run_each_cell_once(home, store):
    env = {**os.environ, "SPARSEBENCH_HOME": str(home)}
    env.pop("MLFLOW_TRACKING_URI", None)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "harness.cli", *COMMON, *matrix],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for matrix in MATRICES
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
        assert err == "", err  # no traceback, no MLflow INFO lines, no alembic chatter
    cells = store.runs("cell")
    ids = Counter(r.data.tags["sparsebench.cell_id"] for r in cells)
    assert len(ids) == 6 and set(ids.values()) == {1}, ids  # 6 cells, one run each
    assert {r.info.status for r in cells} == {"FINISHED"}
    assert {r.info.status for r in store.runs("matrix")} == {"FINISHED"}
    # every process says what it did with every cell it was asked for: ran it, or found it done
    # or running elsewhere; together they ran each cell once
    rows = [[c.strip() for c in line.split("│")] for out, _ in outputs for line in out.splitlines()]
    ran = sorted(row[1] for row in rows if len(row) > 3 and row[2] == "finished")
    assert len(ran) == 6 and len(set(ran)) == 6, "\n".join(out for out, _ in outputs)


def _claim(args: tuple[str, int]) -> bool:
    uri, worker = args
    from mlflow.tracking import MlflowClient

    owner = Owner("test-host", 1000 + worker, f"w{worker}")
    return try_claim(MlflowClient(tracking_uri=uri), "1", "c0ffee", 1, owner) is not None


def test_one_process_wins_a_claim_generation(home):
    from harness.store.client import open_client

    uri = f"sqlite:///{home / 'mlflow.db'}"
    client = open_client(uri, create=True)
    with ProcessPoolExecutor(4) as pool:
        won = list(pool.map(_claim, [(uri, i) for i in range(8)]))
    assert won.count(True) == 1
    claim = current_claim(client, "1", "c0ffee")
    assert claim is not None and claim.generation == 1
    assert claim.owner == f"test-host:{1000 + won.index(True)}:w{won.index(True)}"
    # the claim is hidden from the dashboard's experiment list, yet its name stays taken
    assert [e.name for e in client.search_experiments()] in ([], ["Default"])
    assert try_claim(client, "1", "c0ffee", 1, Owner.me()) is None
