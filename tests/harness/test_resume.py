"""Exact resume: a cell interrupted by a signal and resumed ends bit for bit where an uninterrupted
one ends, in the same MLflow run, for each of the three tasks (real training steps, real store).

The interruption is a real signal the process sends itself mid-step (the ``sparse_probe``
estimator, see conftest); the handler lets the step finish, checkpoints, marks the cell and the
parent run KILLED and exits 128 + the signal. Kills of separate processes at random steps are in
``test_kill.py``.
"""

from __future__ import annotations

import signal

import pytest

from harness.cli import main

IDENTITY = [
    "--task", "identity",
    "--set", "tasks.identity.variants=[{n = 8}]",
    "--set", "tuning.trials=0",  # one cell per configuration, no tuning trials
    "--set", "diagnostics.every=0",  # the probe counts training forwards: gradient draws would too
    "--set", "tasks.identity.steps=90",
    "--set", "tasks.identity.eval_every=20",
    "--set", "tasks.identity.eval_samples=300",
    "--set", "tasks.identity.snapshots=[0, 40, 90]",
]
ATTENTION = [
    "--task", "attention",
    "--set", "tasks.attention.variants=[{glimpses = 2, glimpse = 8}]",
    "--set", "tuning.trials=0",  # one cell per configuration, no tuning trials
    "--set", "diagnostics.every=0",  # the probe counts training forwards: gradient draws would too
    "--set", "tasks.attention.canvas=32",
    "--set", "tasks.attention.clutter='deepmind'",
    "--set", "tasks.attention.train_images=40",  # 2.5 epochs of 16: the resume crosses an epoch
    "--set", "tasks.attention.test_images=32",
    "--set", "tasks.attention.batch_size=16",
    "--set", "tasks.attention.steps=6",
    "--set", "tasks.attention.eval_every=3",
    "--set", "tasks.attention.snapshots=[0, 6]",
    "--set", "estimators.sparse_probe.a_l=4",
    "--set", "estimators.sparse_probe.a_g=4",
]
SORTING = [
    "--task", "sorting",
    "--set", "tasks.sorting.variants=[{n = 4}]",
    "--set", "tuning.trials=0",  # one cell per configuration, no tuning trials
    "--set", "diagnostics.every=0",  # the probe counts training forwards: gradient draws would too
    "--set", "tasks.sorting.digits=1",
    "--set", "tasks.sorting.batch_size=4",
    "--set", "tasks.sorting.steps=6",
    "--set", "tasks.sorting.eval_every=3",
    "--set", "tasks.sorting.eval_instances=16",
    "--set", "tasks.sorting.snapshots=[0, 4]",
]


def _args(task_args: list[str], *extra: str) -> list[str]:
    return ["run", *task_args, "--estimator", "sparse_probe", "--plugin", "sb_probe", "--no-progress",
            "--threads", "1", *extra]


def _artifacts(store, run_id: str) -> dict[str, bytes]:
    """Every snapshot file of a run: path -> bytes."""
    from pathlib import Path

    root = Path(store.client.download_artifacts(run_id, "snapshots"))
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    ("task_args", "kill_at", "every"),
    [(IDENTITY, 47, "10"), (ATTENTION, 4, "2"), (SORTING, 4, "2")],
    ids=["identity", "attention", "sorting"],
)
def test_signal_checkpoint_resume_equals_uninterrupted(
    task_args, kill_at, every, probe, tmp_path, monkeypatch, capsys, store_at, seeded
):
    args = _args(task_args, "--checkpoint-steps", every)
    monkeypatch.setenv("SPARSEBENCH_HOME", str(seeded(tmp_path / "reference")))
    assert main(args) == 0
    reference = store_at(tmp_path / "reference").cell()

    home = seeded(tmp_path / "resumed")
    store = store_at(home)
    monkeypatch.setenv("SPARSEBENCH_HOME", str(home))
    monkeypatch.setenv("SB_PROBE_SIGNAL", f"SIGTERM:{kill_at}")
    capsys.readouterr()
    assert main(args) == 128 + signal.SIGTERM
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "interrupted by SIGTERM" in err[0] and "checkpointed at step" in err[0]
    assert "resume with: sparsebench run" in err[0]
    killed = store.cell()
    assert killed.info.status == "KILLED" and killed.data.tags["sparsebench.status"] == "killed"
    assert [r.info.status for r in store.runs("matrix")] == ["KILLED"]
    assert len(store.checkpoints()) == 1
    stopped_at = int(killed.data.tags["sparsebench.checkpoint_step"])
    assert 0 < stopped_at <= kill_at  # the step the signal came in finished first

    monkeypatch.delenv("SB_PROBE_SIGNAL")
    assert main(args) == 0
    resumed = store.cell()  # still one cell run: the resume went into the same run
    assert resumed.info.run_id == killed.info.run_id
    assert resumed.info.status == "FINISHED" and resumed.data.tags["sparsebench.resumes"] == "1"
    assert [r.info.status for r in store.runs("matrix")] == ["KILLED", "FINISHED"]
    assert resumed.data.tags["mlflow.parentRunId"] == store.runs("matrix")[1].info.run_id
    assert store.checkpoints() == []  # pruned once the cell finished

    expected = store_at(tmp_path / "reference").history(reference.info.run_id)
    assert store.history(resumed.info.run_id) == expected  # every value, bit for bit; no step twice
    assert any(step > stopped_at for step, _ in expected["test/" + _primary(reference)])
    assert _artifacts(store, resumed.info.run_id) == _artifacts(
        store_at(tmp_path / "reference"), reference.info.run_id
    )


def _primary(run) -> str:
    return run.data.tags["sparsebench.primary_metric"].removeprefix("test/")


@pytest.mark.parametrize("name", ["SIGINT", "SIGHUP"])
def test_sigint_and_sighup_are_handled_as_sigterm(name, probe, store_home, monkeypatch, capsys, store):
    args = _args(IDENTITY, "--checkpoint-steps", "1000")
    monkeypatch.setenv("SB_PROBE_SIGNAL", f"{name}:30")
    assert main(args) == 128 + getattr(signal, name)
    err = capsys.readouterr().err
    assert f"interrupted by {name}; identity/n=8/sparse_probe/seed=0 checkpointed at step 30" in err
    assert store.cell().info.status == "KILLED"
    assert len(store.checkpoints()) == 1  # written for the signal, though no interval was due
