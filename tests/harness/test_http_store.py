"""Through a real ``mlflow server`` (what parallel workers on several hosts talk to): claims stay
atomic, checkpoints become run artifacts that follow their newest upload, and a cell interrupted
there resumes into its run exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from harness.cli import main
from harness.store.claims import Owner, current_claim, try_claim
from harness.store.server import answers, free_port

SERVER_START_S = 180  # the server imports MLflow's whole app; slow on a loaded 2-core machine
CELL = [
    "run",
    "--task",
    "identity",
    "--estimator",
    "sparse_probe",
    "--plugin",
    "sb_probe",
    "--set",
    "tasks.identity.variants=[{n = 8}]",
    "--set",
    "tuning.trials=0",  # one cell per configuration
    "--set",
    "diagnostics.every=0",  # the probe counts training forwards: gradient draws would too
    "--set",
    "tasks.identity.steps=60",
    "--set",
    "tasks.identity.eval_every=20",
    "--set",
    "tasks.identity.eval_samples=200",
    "--set",
    "tasks.identity.snapshots=[0, 60]",
    "--checkpoint-steps",
    "10",
    "--no-progress",
]



@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``mlflow server`` on a fresh sqlite store, serving artifacts; its URI."""
    folder = tmp_path_factory.mktemp("server")
    port = free_port()
    log = (folder / "server.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{folder / 'mlflow.db'}",
            "--artifacts-destination",
            str(folder / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=folder,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while not answers(f"{uri}/health"):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer on port {port}; see {log.name}")
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _claim(args: tuple[str, int]) -> bool:
    uri, worker = args
    from mlflow.tracking import MlflowClient

    owner = Owner("worker-host", 2000 + worker, f"w{worker}")
    return try_claim(MlflowClient(tracking_uri=uri), "7", "feed", 1, owner) is not None


def test_claims_over_http_have_one_winner(server):
    from mlflow.tracking import MlflowClient

    with ProcessPoolExecutor(4) as pool:
        won = list(pool.map(_claim, [(server, i) for i in range(8)]))
    assert won.count(True) == 1
    claim = current_claim(MlflowClient(tracking_uri=server), "7", "feed")
    assert claim.generation == 1 and claim.owner.startswith("worker-host:")


def test_interrupted_cell_resumes_from_artifact_checkpoints(
    server, probe, seeded, tmp_path, monkeypatch, capsys, store_at
):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("SPARSEBENCH_HOME", str(seeded(tmp_path / "reference")))
    assert main(CELL) == 0
    reference = store_at(tmp_path / "reference")
    expected = reference.history(reference.cell().info.run_id)

    monkeypatch.setenv("SPARSEBENCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SB_PROBE_SIGNAL", "SIGTERM:35")
    assert main([*CELL, "--tracking-uri", server]) == 128 + signal.SIGTERM
    assert "checkpointed at step 35" in capsys.readouterr().err
    client = MlflowClient(tracking_uri=server)
    experiment = client.get_experiment_by_name("sparsebench-quick").experiment_id
    (run,) = client.search_runs([experiment], "tags.`sparsebench.role` = 'cell'")
    assert run.info.status == "KILLED"
    assert run.data.tags["sparsebench.checkpoint"] == "checkpoint/step=35.pt"
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")] == ["checkpoint/step=35.pt"]
    assert not Path(tmp_path / "home" / "checkpoints").exists()  # nothing local for a remote store

    monkeypatch.delenv("SB_PROBE_SIGNAL")
    assert main([*CELL, "--tracking-uri", server]) == 0
    (after,) = client.search_runs([experiment], "tags.`sparsebench.role` = 'cell'")
    assert after.info.run_id == run.info.run_id and after.info.status == "FINISHED"
    assert "sparsebench.checkpoint" not in after.data.tags
    assert client.list_artifacts(run.info.run_id, "checkpoint") == []  # pruned
    history = {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        for key in sorted(after.data.metrics)
        if not key.startswith(("time/", "summary/"))
    }
    assert history == expected
