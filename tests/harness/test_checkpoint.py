"""Checkpoint files: every generator restored exactly, writes atomic, artifact checkpoints that
point at their newest upload and are pruned."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from harness.store.checkpoint import (
    ArtifactCheckpoints,
    CheckpointPolicy,
    CorruptCheckpoint,
    LocalCheckpoints,
    capture_rng,
    restore_rng,
)
from harness.store.tracking import Tracker
from reports.schema import CHECKPOINT_FORMAT

CPU = torch.device("cpu")


def _draws() -> tuple[float, float, list[float]]:
    return random.random(), float(np.random.randn()), torch.rand(3).tolist()


def _state(step: int) -> dict:
    model = torch.nn.Linear(3, 2)
    return {
        "format": CHECKPOINT_FORMAT,
        "cell_id": "abc",
        "step": step,
        "model": model.state_dict(),
        "rng": capture_rng(CPU),
        "pending": [[step, {"train/loss": 0.5}]],
    }


def test_every_generator_is_restored_exactly():
    random.seed(1)
    np.random.seed(2)
    np.random.randn()  # numpy keeps a cached Gaussian: the state must carry it
    torch.manual_seed(3)
    saved = capture_rng(CPU)
    expected = _draws()
    _draws()
    restore_rng(saved)
    assert _draws() == expected


def test_local_checkpoints_round_trip_through_weights_only_load(tmp_path):
    store = LocalCheckpoints(tmp_path / "checkpoints")
    assert store.load("run1", CPU) is None
    state = _state(7)
    store.save("run1", state)
    back = store.load("run1", CPU)
    assert back["step"] == 7 and back["pending"] == [[7, {"train/loss": 0.5}]]
    assert torch.equal(back["model"]["weight"], state["model"]["weight"])
    store.prune("run1")
    assert store.load("run1", CPU) is None


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path):
    store = LocalCheckpoints(tmp_path)
    store.save("run1", _state(1))
    with pytest.raises(Exception):  # noqa: B017  (torch.save cannot pickle a lambda)
        store.save("run1", {**_state(2), "bad": lambda: None})
    assert store.load("run1", CPU)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["run1.pt"]  # no temporary file left


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    torch.save({"step": 3}, tmp_path / "run1.pt")
    with pytest.raises(CorruptCheckpoint, match="corrupt: ValueError: not a sparsebench.checkpoint/1"):
        LocalCheckpoints(tmp_path).load("run1", CPU)
    assert (tmp_path / "run1.pt.corrupt").exists()  # set aside, so the cell can start afresh


def test_artifact_checkpoints_point_at_the_newest_upload_and_prune(store_home):
    uri = f"sqlite:///{store_home / 'mlflow.db'}"
    tracker = Tracker(uri)
    run_id = tracker.client.create_run(tracker.experiment("quick")).info.run_id
    store = ArtifactCheckpoints(tracker.client, uri)
    assert store.load(run_id, CPU) is None
    store.save(run_id, _state(10))
    store.save(run_id, _state(20))
    assert store.load(run_id, CPU)["step"] == 20
    listed = [a.path for a in tracker.client.list_artifacts(run_id, "checkpoint")]
    assert listed == ["checkpoint/step=20.pt"]  # the older upload is deleted once the tag moved
    store.prune(run_id)
    assert tracker.client.list_artifacts(run_id, "checkpoint") == []
    assert store.load(run_id, CPU) is None


def test_policy_is_due_by_steps_or_minutes_and_placed_by_store():
    policy = CheckpointPolicy(every_steps=100, every_minutes=10)
    assert not policy.due(99, 599.0)
    assert policy.due(100, 0.0) and policy.due(1, 600.0)
    assert not CheckpointPolicy(every_steps=0, every_minutes=10).due(10**6, 1.0)
    local = CheckpointPolicy.for_store("sqlite:////data/runs/mlflow.db")
    assert local.directory == "/data/runs/checkpoints" and local.every_minutes == 10
    assert CheckpointPolicy.for_store("http://127.0.0.1:5000").directory is None
