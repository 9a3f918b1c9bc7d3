"""Real ``sparsebench run`` processes killed at random steps, then resumed.

Each trial starts the CLI in its own process and store, waits for the cell's first checkpoint,
waits a random moment longer, and sends a signal: SIGKILL (nothing runs after it), or SIGTERM,
SIGHUP, SIGINT (handled: checkpoint, KILLED, one line, exit 128 + signal). The next ``run`` on
that store marks what a SIGKILL left RUNNING as KILLED, saying so, takes the cell over from its
checkpoint into the same run, and ends with a metric history equal, bit for bit, to that of the
same cell run without interruption.

``SPARSEBENCH_KILL_TRIALS=20`` (and ``SPARSEBENCH_KILL_SEED``) run more trials, five at a time.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from harness.cli import main

TRIALS = ("SIGKILL", "SIGKILL", "SIGTERM", "SIGHUP", "SIGINT")
ARGS = [
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
    "tasks.identity.steps=300",
    "--set",
    "tasks.identity.eval_every=50",
    "--set",
    "tasks.identity.eval_samples=300",
    "--set",
    "tasks.identity.snapshots=[0, 150, 300]",
    "--checkpoint-steps",
    "20",
    "--threads",
    "1",
    "--no-progress",
]
STEPS, EVERY = 300, 20  # as in ARGS
STEP_SLEEP_S = "0.02"  # each training step of the killed processes lasts at least this long (6 s in all)
MAX_DELAY_S = 0.3  # after the chosen checkpoint, the kill comes up to this long later (15 steps at most)
CHECKPOINT_WAIT_S = 240  # generous: the machine may be busy with other work
WAVE = 5  # processes killed at once


@pytest.fixture(autouse=True)
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _checkpoint_step(home: Path) -> int:
    found = list((home / "checkpoints").glob("*.pt"))
    return torch.load(found[0], weights_only=True)["step"] if found else -1


def _wait_for_checkpoint(home: Path, proc: subprocess.Popen, step: int) -> None:
    deadline = time.monotonic() + CHECKPOINT_WAIT_S
    while _checkpoint_step(home) < step:
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before its checkpoint at {step}"
        assert time.monotonic() < deadline, f"no checkpoint at step {step} appeared"
        time.sleep(0.02)


def _start(home: Path, env: dict[str, str], err: Path) -> subprocess.Popen:
    with err.open("w") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "harness.cli", *ARGS],
            env={**env, "SPARSEBENCH_HOME": str(home)},
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )


def _kill(
    name: str, home: Path, proc: subprocess.Popen, err: Path, moment: tuple[int, float], store_at
) -> None:
    """Signal a run ``moment = (step, delay)``: ``delay`` seconds after its checkpoint at ``step``;
    check how it ended."""
    _wait_for_checkpoint(home, proc, moment[0])
    time.sleep(moment[1])
    assert proc.poll() is None, f"{name}: the run finished before it could be killed"
    proc.send_signal(getattr(signal, name))
    rc = proc.wait(timeout=120)
    lines = err.read_text().strip().splitlines()
    store = store_at(home)
    if name == "SIGKILL":
        assert rc == -signal.SIGKILL
        assert store.cell().info.status == "RUNNING"  # nothing ran after the kill: the next run reconciles it
    else:
        assert rc == 128 + getattr(signal, name), lines
        assert len(lines) == 1 and f"interrupted by {name}; identity/n=8/sparse_probe/seed=0 " in lines[0]
        assert store.cell().info.status == "KILLED"
    assert len(store.checkpoints()) == 1


def test_kill_at_random_steps_then_resume_equals_uninterrupted(
    probe, tmp_path, monkeypatch, capsys, store_at, seeded
):
    env = {**os.environ, "SB_PROBE_SLEEP": STEP_SLEEP_S}
    env["PYTHONPATH"] = os.pathsep.join([str(probe), env.get("PYTHONPATH", "")])
    env.pop("MLFLOW_TRACKING_URI", None)
    trials = [
        TRIALS[i % len(TRIALS)] for i in range(int(os.environ.get("SPARSEBENCH_KILL_TRIALS", len(TRIALS))))
    ]
    rng = random.Random(int(os.environ.get("SPARSEBENCH_KILL_SEED", "11")))
    expected = None
    stopped = []
    for wave in range(0, len(trials), WAVE):  # a few processes at a time on a small machine
        names = trials[wave : wave + WAVE]
        homes = [seeded(tmp_path / f"trial{wave + i}-{name}") for i, name in enumerate(names)]
        errs = [tmp_path / f"trial{wave + i}.err" for i in range(len(names))]
        procs = [_start(home, env, err) for home, err in zip(homes, errs, strict=True)]
        if expected is None:  # the uninterrupted cell, meanwhile
            monkeypatch.setenv("SPARSEBENCH_HOME", str(seeded(tmp_path / "reference")))
            assert main(ARGS) == 0
            reference = store_at(tmp_path / "reference")
            expected = reference.history(reference.cell().info.run_id)
        moments = [(EVERY * rng.randrange(1, STEPS // EVERY - 1), rng.uniform(0, MAX_DELAY_S)) for _ in names]
        with ThreadPoolExecutor(len(names)) as pool:  # each process meets its own moment
            for done in [
                pool.submit(_kill, *args, store_at)
                for args in zip(names, homes, procs, errs, moments, strict=True)
            ]:
                done.result()
        for name, home in zip(names, homes, strict=True):
            store = store_at(home)
            before = store.cell()
            stopped.append((name, int(before.data.tags["sparsebench.checkpoint_step"])))
            monkeypatch.setenv("SPARSEBENCH_HOME", str(home))
            capsys.readouterr()
            assert main(ARGS) == 0
            err = capsys.readouterr().err
            if name == "SIGKILL":
                assert "marked KILLED, its owner is gone: identity/n=8/sparse_probe/seed=0" in err
                assert "has exited" in err
            after = store.cell()
            assert after.info.run_id == before.info.run_id and after.info.status == "FINISHED"
            assert store.history(after.info.run_id) == expected, stopped[-1]
            assert store.checkpoints() == []
            assert {r.info.status for r in store.runs("matrix")} <= {"KILLED", "FINISHED"}
    print(f"\n{len(trials)} trials, all resumed equal; (signal, last checkpoint step): {stopped}")
