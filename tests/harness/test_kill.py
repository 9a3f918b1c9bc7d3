"""Real ``sparsebench run`` processes killed at random steps, then resumed.

Each trial starts the CLI in its own process and store, waits for the cell's first checkpoint,
waits a random moment longer, and sends a signal: SIGKILL (nothing runs after it), or SIGTERM,
SIGHUP, SIGINT (handled: checkpoint, KILLED, one line, exit 128 + signal). The next ``run`` on
that store marks what a SIGKILL left RUNNING as KILLED, saying so, takes the cell over from its
checkpoint into the same run, and ends with a metric history equal, bit for bit, to that of the
same cell run without interruption.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harness.cli import main

TRIALS = ("SIGKILL", "SIGKILL", "SIGTERM", "SIGHUP", "SIGINT")
ARGS = [
    "run", "--task", "identity", "--estimator", "sparse_probe", "--plugin", "sb_probe",
    "--set", "tasks.identity.variants=[{n = 8}]",
    "--set", "tasks.identity.steps=300",
    "--set", "tasks.identity.eval_every=50",
    "--set", "tasks.identity.eval_samples=300",
    "--set", "tasks.identity.snapshots=[0, 150, 300]",
    "--checkpoint-steps", "20", "--threads", "1", "--no-progress",
]
STEP_SLEEP_S = "0.01"  # each training step of the killed processes lasts at least this long
FIRST_CHECKPOINT_S = 180  # generous: the machine may be busy with other work


@pytest.fixture(autouse=True)
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _wait_for_checkpoint(home: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + FIRST_CHECKPOINT_S
    while not list((home / "checkpoints").glob("*.pt")):
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)


def test_kill_at_random_steps_then_resume_equals_uninterrupted(
    probe, tmp_path, monkeypatch, capsys, store_at, seeded
):
    env = {**os.environ, "SB_PROBE_SLEEP": STEP_SLEEP_S}
    env["PYTHONPATH"] = os.pathsep.join([str(probe), env.get("PYTHONPATH", "")])
    env.pop("MLFLOW_TRACKING_URI", None)
    procs = []
    for i, name in enumerate(TRIALS):
        home = seeded(tmp_path / f"trial{i}-{name}")
        err = (tmp_path / f"trial{i}.err").open("w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "harness.cli", *ARGS],
            env={**env, "SPARSEBENCH_HOME": str(home)},
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        procs.append((name, home, proc, err))

    monkeypatch.setenv("SPARSEBENCH_HOME", str(seeded(tmp_path / "reference")))
    assert main(ARGS) == 0  # the uninterrupted cell, meanwhile
    reference = store_at(tmp_path / "reference")
    expected = reference.history(reference.cell().info.run_id)

    rng = random.Random(11)
    for name, home, proc, _ in procs:
        _wait_for_checkpoint(home, proc)
        time.sleep(rng.uniform(0.0, 0.8))
        assert proc.poll() is None, f"{name}: the run finished before it could be killed"
        proc.send_signal(getattr(signal, name))
    for name, home, proc, err in procs:
        rc = proc.wait(timeout=120)
        err.close()
        lines = (tmp_path / err.name).read_text().strip().splitlines()
        store = store_at(home)
        cell = store.cell()
        if name == "SIGKILL":
            assert rc == -signal.SIGKILL
            assert cell.info.status == "RUNNING"  # nothing ran after the kill: the next run reconciles it
        else:
            assert rc == 128 + getattr(signal, name), lines
            assert len(lines) == 1 and f"interrupted by {name}; identity/n=8/sparse_probe/seed=0 " in lines[0]
            assert cell.info.status == "KILLED"
        assert len(store.checkpoints()) == 1

    stopped = []
    for name, home, _, _ in procs:
        store = store_at(home)
        before = store.cell()
        stopped.append(int(before.data.tags["sparsebench.checkpoint_step"]))
        monkeypatch.setenv("SPARSEBENCH_HOME", str(home))
        capsys.readouterr()
        assert main(ARGS) == 0
        err = capsys.readouterr().err
        if name == "SIGKILL":
            assert "marked KILLED, its owner is gone: identity/n=8/sparse_probe/seed=0" in err
            assert "has exited" in err
        after = store.cell()
        assert after.info.run_id == before.info.run_id and after.info.status == "FINISHED"
        assert store.history(after.info.run_id) == expected, f"{name} at step {stopped[-1]}"
        assert store.checkpoints() == []
        assert {r.info.status for r in store.runs("matrix")} <= {"KILLED", "FINISHED"}
    print(f"killed at checkpointed steps {stopped}; all {len(TRIALS)} resumed equal")
