"""The identity task's snapshots (Fig. 3): the step-0 snapshot carries sampled tuples, and taking
it changes no training number (real layers, real training steps in the runner's order)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from estimators.plugins.reinforce import ReinforceEstimator
from estimators.plugins.sparse import SparseEstimator
from harness.task import CellSetup
from plugins.identity import IdentityTask

ESTIMATORS = {"sparse": SparseEstimator(), "reinforce": ReinforceEstimator()}


def _run(estimator: str, snapshots: list[int], out: Path) -> list[dict[str, float]]:
    """Train 12 steps as the runner does (snapshot before a step's forward, Adam, eval every 4)."""
    task = IdentityTask()
    params = {**task.defaults, "n": 8, "steps": 12, "eval_every": 4, "batch_size": 16,
              "eval_samples": 256, "snapshots": snapshots}
    torch.manual_seed(3)  # the runner seeds the global RNG before building the layer
    est = ESTIMATORS[estimator]
    layer = est.build(task.spec("sparse_matrix", params), {**est.defaults, "a_l": 1, "a_g": 2})
    run = task.setup(CellSetup(params, layer, "sparse_matrix", torch.device("cpu"), 3, out))
    optimiser = torch.optim.Adam(run.model.parameters(), lr=params["lr"])
    history = []
    for step in range(run.steps):
        if step in run.snapshot_steps:
            (out / str(step)).mkdir(parents=True)
            run.write_artifacts(step, out / str(step))
        objective, metrics = run.train_step(step)
        optimiser.zero_grad()
        objective.backward()
        optimiser.step()
        if (step + 1) % run.eval_every == 0:
            run.model.eval()
            with torch.no_grad():
                metrics |= run.evaluate()
            run.model.train()
        history.append({"objective": objective.item(), **metrics})
    return history


@pytest.mark.parametrize("estimator", sorted(ESTIMATORS))
def test_step_0_snapshot_has_samples_and_changes_no_training_number(estimator: str, tmp_path: Path):
    with_snapshots = _run(estimator, [0, 5], tmp_path / "with")
    without = _run(estimator, [], tmp_path / "without")
    assert with_snapshots == without  # every objective, train and eval metric, bit for bit
    first = json.loads((tmp_path / "with" / "0" / "layer.json").read_text())
    assert first["step"] == 0 and len(first["samples"]) == 8  # one entry per continuous tuple
    samples = torch.tensor(first["samples"]).reshape(-1, 2)
    assert samples.min() >= 0 and samples.max() <= 7  # integer tuples inside the 8 x 8 matrix
    again = _run(estimator, [0], tmp_path / "again")
    assert again == without
    repeat = json.loads((tmp_path / "again" / "0" / "layer.json").read_text())
    assert repeat["samples"] == first["samples"]  # seeded: the same cell draws the same points
