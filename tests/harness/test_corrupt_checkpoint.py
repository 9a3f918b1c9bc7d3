"""A checkpoint that cannot be read back is named, set aside, and its cell restarts from step 0
in the same MLflow run, with a warning and no FAILED run; the replayed steps recompute exactly
the metrics the run already holds, so the run ends equal to an uninterrupted one."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from harness.cli import main
from harness.store.checkpoint import CorruptCheckpoint, LocalCheckpoints

ARGS = [
    "run", "--task", "identity", "--estimator", "sparse_probe", "--plugin", "sb_probe",
    "--set", "tasks.identity.variants=[{n = 8}]",
    "--set", "tuning.trials=0",  # one cell per configuration, no tuning trials
    "--set", "diagnostics.every=0",  # the probe counts training forwards: gradient draws would too
    "--set", "tasks.identity.steps=60",
    "--set", "tasks.identity.eval_every=20",
    "--set", "tasks.identity.eval_samples=200",
    "--checkpoint-steps", "10", "--no-progress", "--threads", "1",
]  # fmt: skip


@pytest.mark.parametrize(
    "damage", [lambda b: os.urandom(len(b)), lambda b: b[: len(b) // 2]], ids=["random-bytes", "truncated"]
)
def test_load_names_a_corrupt_checkpoint_and_sets_it_aside(tmp_path, damage):
    store = LocalCheckpoints(tmp_path)
    store.save("run1", {"format": "sparsebench.checkpoint/1", "step": 3, "weights": torch.ones(1000)})
    path = store.path("run1")
    path.write_bytes(damage(path.read_bytes()))
    expected = rf"checkpoint {path} is corrupt: .*; set aside as run1.pt.corrupt"
    with pytest.raises(CorruptCheckpoint, match=expected):
        store.load("run1", torch.device("cpu"))
    assert not path.exists() and (tmp_path / "run1.pt.corrupt").exists()
    assert store.load("run1", torch.device("cpu")) is None  # nothing left to resume from


def test_a_corrupt_checkpoint_restarts_the_cell_from_step_0_in_the_same_run(
    probe, tmp_path, monkeypatch, capsys, store_at, seeded
):
    monkeypatch.setenv("SPARSEBENCH_HOME", str(seeded(tmp_path / "reference")))
    assert main(ARGS) == 0
    reference = store_at(tmp_path / "reference")

    home = seeded(tmp_path / "home")
    store = store_at(home)
    monkeypatch.setenv("SPARSEBENCH_HOME", str(home))
    monkeypatch.setenv("SB_PROBE_SIGNAL", "SIGTERM:35")
    assert main(ARGS) == 128 + signal.SIGTERM
    monkeypatch.delenv("SB_PROBE_SIGNAL")
    killed = store.cell()
    [checkpoint] = store.checkpoints()
    checkpoint.write_bytes(os.urandom(4096))

    capsys.readouterr()
    assert main(ARGS) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"sparsebench: warning: checkpoint {checkpoint} is corrupt: ")
    assert err[0].endswith(
        f"set aside as {checkpoint.name}.corrupt; cell identity/n=8/sparse_probe/seed=0 restarts from step 0 "
        "in the same run"
    )  # and no "metric values recomputed ... differ" warning: the replay matched what was logged
    assert checkpoint.with_name(checkpoint.name + ".corrupt").exists()
    resumed = store.cell()  # one cell run: the same one, finished, never FAILED
    assert resumed.info.run_id == killed.info.run_id and resumed.info.status == "FINISHED"
    ref_run = reference.cell()
    assert store.history(resumed.info.run_id) == reference.history(ref_run.info.run_id)  # no step twice
