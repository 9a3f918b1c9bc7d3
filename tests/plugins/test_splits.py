"""Validation splits (issue 19): every task scores a validation split disjoint from its test data,
logs each metric as ``val/<m>`` and ``test/<m>``, and judges its target on ``val/``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from harness import plugins
from harness.task import CellSetup, TaskRun, data_root, evaluating
from plugins.attention import VAL_SEED_OFFSET as ATTENTION_VAL_OFFSET
from plugins.attention import AttentionTask, _clutter
from plugins.data.cluttered import cluttered_mnist
from plugins.data.numbers import validation_split
from plugins.data.sources import load_digits
from plugins.gradient_study import GradientStudy
from plugins.identity import EVAL_SEED_OFFSET, SNAPSHOT_SEED_OFFSET, IdentityTask
from plugins.identity import VAL_SEED_OFFSET as IDENTITY_VAL_OFFSET
from plugins.sorting import PAPER_TARGET, SortingTask

REGISTRY = plugins.load()


def _setup(task_name: str, tmp: Path, estimator: str = "dense", **extra) -> TaskRun:
    """A task's smoke cell with ``estimator``, built as the runner builds it."""
    task, est = REGISTRY.task(task_name), REGISTRY.estimator(estimator)
    params = {**task.defaults, **task.smoke, **extra}
    kind = next(k for k in task.kinds if est.unsupported(task.spec(k, params)) is None)
    spec = task.spec(kind, params)
    torch.manual_seed(0)
    layer = est.build(spec, est.defaults)
    return task.setup(CellSetup(params, layer, kind, torch.device("cpu"), 0, tmp / "cache", spec))


@pytest.mark.parametrize("task_name", sorted(REGISTRY.tasks))
def test_every_task_logs_each_metric_on_validation_and_test(task_name: str, tmp_path: Path) -> None:
    task = REGISTRY.task(task_name)
    run = _setup(task_name, tmp_path)
    if isinstance(task, GradientStudy):
        run.train_step(0)  # the gradient study measures in its one training step; evaluate reports it
    with evaluating(run.model):
        metrics = run.evaluate()
    val = {k.removeprefix("val/") for k in metrics if k.startswith("val/")}
    test = {k.removeprefix("test/") for k in metrics if k.startswith("test/")}
    assert val == test and val and set(metrics) == {f"val/{m}" for m in val} | {f"test/{m}" for m in test}
    assert task.select_metric == task.primary_metric.replace("test/", "val/")
    assert task.select_metric in metrics and task.primary_metric in metrics
    if run.target is not None:  # a target is judged on validation, never on test
        assert run.target.metric.startswith("val/") and run.target.metric in metrics


def test_targets_are_the_papers(tmp_path: Path) -> None:
    """Identity: exact I; sorting at n = 4 of the paper's protocol: §3.3's "below 10%", none at
    other sizes; attention: Table 1's best RAM error."""
    assert str(_setup("identity", tmp_path).target) == "val/mse <= 0"
    assert str(_setup("sorting", tmp_path, n=4).target) == str(PAPER_TARGET) == "val/error_pct <= 10"
    assert _setup("sorting", tmp_path, n=8).target is None
    assert str(_setup("attention", tmp_path).target) == "val/error_pct <= 8.11"


def test_identity_validation_vectors_have_their_own_seed(tmp_path: Path) -> None:
    offsets = {0, EVAL_SEED_OFFSET, SNAPSHOT_SEED_OFFSET, IDENTITY_VAL_OFFSET}
    assert len(offsets) == 4  # training, test, snapshot and validation streams never share a seed
    run = _setup("identity", tmp_path, estimator="reinforce")  # untrained: W is far from I
    with evaluating(run.model):
        metrics = run.evaluate()
    assert metrics["val/mse"] != metrics["test/mse"]  # other vectors
    assert metrics["val/rows_correct"] == metrics["test/rows_correct"]  # W alone
    assert IdentityTask.select_metric == "val/mse"


def test_attention_validation_images_come_from_held_out_training_digits(tmp_path: Path) -> None:
    """The validation canvases are drawn (digit and clutter) only from every 6th training digit,
    the training canvases only from the others; and ``val/error_pct`` is the error on them."""
    task = AttentionTask()
    params = {**task.defaults, **task.smoke}
    run = _setup("attention", tmp_path)
    pool = load_digits(params["dataset"], data_root()).train
    train_digits, val_digits = validation_split(pool)
    positions = torch.arange(len(pool))
    held = positions % 6 == 5
    train_pos, val_pos = positions[~held], positions[held]
    assert set(train_pos.tolist()).isdisjoint(val_pos.tolist())
    assert len(train_pos) + len(val_pos) == len(pool)
    config = _clutter(params)
    cache = tmp_path / "cache"
    train = cluttered_mnist(train_digits, params["train_images"], config, params["data_seed"], cache)
    val = cluttered_mnist(val_digits, params["test_images"], config,
                          params["data_seed"] + ATTENTION_VAL_OFFSET, cache)

    def used(canvases, where: torch.Tensor) -> set[int]:  # positions in the pool: digits and clutter
        return set(where[canvases.digit_index].tolist() + where[canvases.clutter_index].flatten().tolist())

    assert used(train, train_pos).isdisjoint(used(val, val_pos))
    with evaluating(run.model):
        metrics = run.evaluate()
        logits = run.model(val.images).logits
    wrong = (logits.argmax(1) != val.labels).sum().item()
    assert metrics["val/error_pct"] == pytest.approx(100.0 * wrong / len(val))
    assert "every 6th training digit" in run.provenance["data.validation"]


def test_sorting_paper_protocol_trains_without_the_validation_digits(tmp_path: Path) -> None:
    """The paper's protocol holds out every 6th training digit too: no training instance of the
    first steps holds a validation digit image (compared pixel for pixel)."""
    params = {**SortingTask.defaults, **SortingTask.smoke}
    assert params["protocol"] == "bloem"
    run = _setup("sorting", tmp_path)
    _, val = validation_split(load_digits(params["dataset"], data_root()).train)
    out = tmp_path / "artifacts"
    for step in range(3):
        out.mkdir(exist_ok=True)
        run.write_artifacts(step, out)
        x = torch.from_numpy(np.load(out / "quicksort_steps.npz")["x"][0])  # (n, digits, 28, 28)
        images = x.flatten(0, 1).flatten(1)  # every digit image of the instance
        held = val.images.flatten(1).to(images.dtype)
        assert not (images[:, None, :] == held[None]).all(-1).any()
    assert "every 6th training digit" in run.provenance["data.validation"]
