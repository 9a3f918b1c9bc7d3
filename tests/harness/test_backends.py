"""The parallel backends on real stores: ``--jobs N`` (worker processes) and ``--backend ray`` (a
real local Ray instance) run every cell exactly once with the metrics of the in-process backend,
bit for bit; a worker killed mid-cell fails only its cell, which the next ``run`` resumes from its
checkpoint (Ray retries it at once); Ctrl-C stops every worker with its cell KILLED; a sqlite
store is refused for a Ray cluster of several nodes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from harness.cli import main

pytest.importorskip("ray")

TINY = [
    "run", "--task", "identity",
    "--set", "tasks.identity.variants=[{n = 4}]",
    "--set", "tuning.trials=0",  # one cell per configuration, no tuning trials
    "--set", "tasks.identity.steps=30",
    "--set", "tasks.identity.eval_every=10",
    "--set", "tasks.identity.eval_samples=200",
    "--set", "tasks.identity.snapshots=[0, 30]",
    "--threads", "1",
]  # fmt: skip
ESTIMATORS = ["--estimator", "dense,sparse,gumbel_sinkhorn,exploding,diverging"]
SLOW = [  # probe cells of 200 steps that sleep 30 ms each: long enough to kill one mid-way
    "run", "--task", "identity", "--estimator", "sparse_probe", "--plugin", "sb_probe",
    "--set", "tasks.identity.variants=[{n = 8}]",
    "--set", "tuning.trials=0",  # one cell per configuration, no tuning trials
    "--set", "tasks.identity.steps=200",
    "--set", "tasks.identity.eval_every=50",
    "--set", "tasks.identity.eval_samples=200",
    "--set", "tasks.identity.snapshots=[]",
    "--checkpoint-steps", "20", "--threads", "1", "--no-progress",
]  # fmt: skip
WAIT_S = 300  # generous: the machine may be busy with other work


@pytest.fixture(autouse=True)
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _outcome(store) -> dict[str, tuple[str, str, dict]]:
    """Each cell's (MLflow status, sparsebench status, metric history) by name; one run per cell."""
    runs = store.runs("cell")
    ids = Counter(r.data.tags["sparsebench.cell_id"] for r in runs)
    assert set(ids.values()) == {1}, ids
    return {
        r.info.run_name: (r.info.status, r.data.tags["sparsebench.status"], store.history(r.info.run_id))
        for r in runs
    }


def test_pool_and_ray_run_each_cell_once_with_the_local_metrics(
    third_party, seeded, tmp_path, monkeypatch, capsys, store_at
):
    outcomes, logs = {}, {}
    for backend, extra in (("local", []), ("pool", ["--jobs", "2"]), ("ray", ["--backend", "ray"])):
        home = seeded(tmp_path / backend)
        monkeypatch.setenv("SPARSEBENCH_HOME", str(home))
        assert main([*TINY, *ESTIMATORS, "--plugin", third_party, *extra]) == 1  # one cell fails
        logs[backend] = capsys.readouterr().out
        store = store_at(home)
        outcomes[backend] = _outcome(store)
        assert {r.data.tags["sparsebench.threads"] for r in store.runs("cell")} == {"1"}
        assert [r.info.status for r in store.runs("matrix")] == ["FAILED"]
        if backend != "local":  # the store was served over HTTP for the run, and the server stopped
            log = (home / "mlflow-server.log").read_text()
            assert "POST /api/2.0/mlflow/runs/log-batch" in log and "Shutting down" in log
    local = outcomes["local"]
    assert {name: status for name, (_, status, _) in local.items()} == {
        "identity/n=4/dense/seed=0": "finished",
        "identity/n=4/sparse/seed=0": "finished",
        "identity/n=4/gumbel_sinkhorn/seed=0": "finished",
        "identity/n=4/exploding/seed=0": "failed",
        "identity/n=4/diverging/seed=0": "diverged",
    }
    assert outcomes["pool"] == local
    assert outcomes["ray"] == local
    # stdout is not a terminal here: a plain line per cell start, evaluation and end
    for backend, out in logs.items():
        lines = out.splitlines()
        for name in local:
            assert any(f" start {name}: 30 steps" in line for line in lines), (backend, out)
            assert any(f" end   {name}: " in line for line in lines), (backend, out)
        assert any(" eval  identity/n=4/dense/seed=0 step 30/30: val/mse=" in line for line in lines)
    assert "with 2 worker processes x 1 threads" in logs["pool"]
    assert "with Ray (1 node" in logs["ray"]


def _start(home: Path, args: list[str], env: dict[str, str], err: Path) -> subprocess.Popen:
    with err.open("w") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "harness.cli", *args],
            env={**env, "SPARSEBENCH_HOME": str(home)},
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )


def _probe_env(probe: Path, sleep: str = "0.03") -> dict[str, str]:
    env = {**os.environ, "SB_PROBE_SLEEP": sleep}
    env["PYTHONPATH"] = os.pathsep.join([str(probe), env.get("PYTHONPATH", "")])
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _wait_for(what: str, proc: subprocess.Popen, check) -> object:
    deadline = time.monotonic() + WAIT_S
    while True:
        found = check()
        if found:
            return found
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what}"
        time.sleep(0.05)


def _checkpointed_workers(store, n: int) -> list[tuple[str, int]]:
    """(run id, worker pid) of ``n`` cell runs that have a checkpoint, once they do."""
    try:
        runs = [r for r in store.runs("cell") if "sparsebench.checkpoint_step" in r.data.tags]
    except Exception:  # the store is being written to; look again
        return []
    if len(runs) < n:
        return []
    return [(r.info.run_id, int(r.data.tags["sparsebench.worker"].rsplit(":", 1)[1])) for r in runs[:n]]


def _reference(probe, seeded, tmp_path, monkeypatch, store_at, seeds: str) -> dict[str, dict]:
    """Histories of the probe cells run without interruption, in this process."""
    home = seeded(tmp_path / "reference")
    monkeypatch.setenv("SPARSEBENCH_HOME", str(home))
    assert main([*SLOW, "--seeds", seeds]) == 0
    store = store_at(home)
    return {r.info.run_name: store.history(r.info.run_id) for r in store.runs("cell")}


def test_killed_pool_worker_fails_its_cell_ctrl_c_stops_the_rest_and_both_resume(
    probe, seeded, tmp_path, monkeypatch, capsys, store_at
):
    home = seeded(tmp_path / "home")
    err = tmp_path / "run.err"
    args = [*SLOW, "--seeds", "0,1,2", "--jobs", "2"]
    proc = _start(home, args, _probe_env(probe), err)
    store = store_at(home)
    expected = _reference(probe, seeded, tmp_path, monkeypatch, store_at, "0,1,2")
    (victim, pid), _ = _wait_for("two checkpointed cells", proc, lambda: _checkpointed_workers(store, 2))
    os.kill(pid, signal.SIGKILL)  # a worker dies mid-cell: only its cell is lost, a new worker starts
    _wait_for("the lost cell recorded", proc, lambda: store.client.get_run(victim).info.status == "FAILED")
    _wait_for("the third cell", proc, lambda: len(store.runs("cell")) == 3)
    proc.send_signal(signal.SIGINT)  # Ctrl-C: every running cell checkpoints and ends KILLED
    assert proc.wait(timeout=WAIT_S) == 130
    lines = err.read_text().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sparsebench: interrupted by SIGINT; "), lines
    assert "(marked KILLED); resume with: sparsebench run " in lines[0]
    lost = store.client.get_run(victim)
    assert lost.data.tags["sparsebench.status"] == "failed"
    assert lost.data.tags["sparsebench.reason"].startswith(f"worker pid {pid} was killed by SIGKILL")
    assert lost.data.tags["sparsebench.worker_lost"] == "1"
    statuses = {r.info.run_id: r.info.status for r in store.runs("cell")}
    assert statuses.pop(victim) == "FAILED"
    assert set(statuses.values()) <= {"KILLED", "FINISHED"} and "KILLED" in statuses.values(), statuses
    assert [r.info.status for r in store.runs("matrix")] == ["KILLED"]
    assert store.checkpoints()  # the lost and the killed cells keep theirs

    monkeypatch.setenv("SPARSEBENCH_HOME", str(home))
    monkeypatch.delenv("SB_PROBE_SLEEP", raising=False)
    before = {r.info.run_name: r.info.run_id for r in store.runs("cell")}
    assert main([*SLOW, "--seeds", "0,1,2"]) == 0  # the lost cell and the killed ones resume
    after = {r.info.run_name: r for r in store.runs("cell")}
    assert {name: r.info.run_id for name, r in after.items()} == before  # into the same runs
    assert {r.info.status for r in after.values()} == {"FINISHED"}
    assert "sparsebench.worker_lost" not in store.client.get_run(victim).data.tags
    assert {name: store.history(r.info.run_id) for name, r in after.items()} == expected
    assert store.checkpoints() == []


@pytest.fixture(scope="module")
def cluster():
    """A Ray cluster of one node with two CPUs, its processes this test module's own."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    yield cluster
    cluster.shutdown()


def test_ray_retries_a_task_whose_worker_died_and_it_resumes_exactly(
    cluster, probe, seeded, tmp_path, monkeypatch, store_at
):
    home = seeded(tmp_path / "home")
    err = tmp_path / "run.err"
    proc = _start(home, [*SLOW, "--backend", "ray", "--address", cluster.address], _probe_env(probe), err)
    store = store_at(home)
    expected = _reference(probe, seeded, tmp_path, monkeypatch, store_at, "0")
    ((run_id, pid),) = _wait_for("a checkpointed cell", proc, lambda: _checkpointed_workers(store, 1))
    os.kill(pid, signal.SIGKILL)  # Ray's worker process dies: Ray runs the task again
    assert proc.wait(timeout=WAIT_S) == 0, err.read_text()
    (cell,) = store.runs("cell")
    assert cell.info.run_id == run_id and cell.info.status == "FINISHED"
    assert int(cell.data.tags["sparsebench.worker"].rsplit(":", 1)[1]) != pid  # the retry's worker
    assert store.history(run_id) == expected["identity/n=8/sparse_probe/seed=0"]
    assert store.checkpoints() == []


def test_ray_refuses_a_store_that_other_nodes_cannot_reach(cluster, store_home, store, capsys):
    args = [*TINY, "--estimator", "dense", "--backend", "ray"]
    assert main([*args, "--address", "ray://127.0.0.1:10001"]) == 2  # Ray Client: refused before connecting
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "workers on other machines cannot reach the store sqlite:///" in err[0], err
    assert "--tracking-uri http://HEAD:5000" in err[0]
    node = cluster.add_node(num_cpus=1)  # a second node joins
    try:
        assert main([*args, "--address", cluster.address]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("sparsebench: error: --backend ray on 2 nodes: workers on other machines")
        assert len([line for line in err if line.startswith("sparsebench")]) == 1
    finally:
        cluster.remove_node(node)
    assert store.runs("cell") == [] and store.runs("matrix") == []


def test_a_cluster_store_is_a_server_that_every_node_reaches():
    from harness.backends.ray_backend import _remote_store_problem as problem

    assert problem("sqlite:////tmp/mlflow.db", 1, client=False) is None  # one node: this machine
    assert problem("http://10.0.0.5:5000", 3, client=False) is None
    assert problem("https://mlflow.example.org", 1, client=True) is None
    assert "cannot reach the store sqlite:///" in problem("sqlite:////tmp/mlflow.db", 2, client=False)
    assert "cannot reach the store postgresql://" in problem("postgresql://h/db", 2, client=False)
    assert "names this machine only" in problem("http://127.0.0.1:5000", 2, client=False)
    assert "names this machine only" in problem("http://localhost:5000", 1, client=True)


def test_jobs_and_address_need_valid_values(store_home, capsys):
    assert main([*TINY, "--jobs", "0"]) == 2
    assert "'0' must be >= 1 (or auto)" in capsys.readouterr().err
    assert main([*TINY, "--jobs", "many"]) == 2
    assert "'many' is not a number of jobs" in capsys.readouterr().err
    assert main([*TINY, "--address", "auto"]) == 2
    assert "--address names a Ray cluster: add --backend ray" in capsys.readouterr().err
