"""Fixtures for harness tests: a tmp sparsebench home (real sqlite MLflow store) and a way to
write third-party plugin modules into a tmp folder on ``sys.path``."""

from __future__ import annotations

import shutil
import sys
import textwrap
from pathlib import Path

import pytest

# A third-party plugin as a user would write it: its own Estimator subclasses and hookimpl.
THIRD_PARTY = '''
import math
import os

import torch
from torch import nn

from estimators.base import Estimator, SparseMatrixSpec, StructureLayer, hookimpl


class ScaledIdentity(StructureLayer):
    """W = a * I with one learned scalar; converges to the identity quickly."""

    def __init__(self, spec, poison=None):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.2))
        self.poison = poison
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.poison == "raise" and self.calls > 3:
            raise RuntimeError("boom from the test estimator")
        if self.poison == "nan" and self.calls > 3:
            return x * float("nan")
        if self.poison == "interrupt" and self.calls > 3 and os.environ.get("SB_TEST_INTERRUPT"):
            raise KeyboardInterrupt
        return self.a * x


class Scaled(Estimator):
    name = "scaled"
    description = "test: W = a I"
    kinds = frozenset({"sparse_matrix"})
    defaults = {"poison": ""}

    def build(self, spec, params):
        return ScaledIdentity(spec, poison=params["poison"] or None)


class Exploding(Scaled):
    name = "exploding"
    defaults = {"poison": "raise"}


class Diverging(Scaled):
    name = "diverging"
    defaults = {"poison": "nan"}


class Interrupting(Scaled):
    name = "interrupting"
    defaults = {"poison": "interrupt"}


@hookimpl
def register_estimators(register):
    for cls in (Scaled, Exploding, Diverging, Interrupting):
        register(cls())
'''


# The sparse estimator under another name, with two test controls read from the environment when
# a layer is built: SB_PROBE_SLEEP (seconds per training forward, so that a subprocess can be
# killed mid-cell) and SB_PROBE_SIGNAL=NAME:K (the process sends itself that signal during its
# K-th training forward: one with gradients, so a snapshot's own draw does not count). Neither
# changes a number the cell computes.
PROBE = """
import os
import signal
import time

import torch

from estimators.base import hookimpl
from estimators.plugins.sparse import SparseEstimator


class Probe(SparseEstimator):
    name = "sparse_probe"

    def build(self, spec, params):
        layer = super().build(spec, params)
        sleep = float(os.environ.get("SB_PROBE_SLEEP", "0"))
        sig, _, at = os.environ.get("SB_PROBE_SIGNAL", "").partition(":")
        inner, calls = layer.forward, [0]

        def forward(*args, **kwargs):
            if layer.training and torch.is_grad_enabled():  # not a snapshot's no-grad draw
                calls[0] += 1
                time.sleep(sleep)
                if sig and calls[0] == int(at):
                    os.kill(os.getpid(), getattr(signal, sig))
            return inner(*args, **kwargs)

        layer.forward = forward
        return layer


@hookimpl
def register_estimators(register):
    register(Probe())
"""


@pytest.fixture(autouse=True)
def own_store(monkeypatch) -> None:
    """No test writes to a store another test named: ``mlflow.set_tracking_uri`` (used to read
    stores back) exports ``MLFLOW_TRACKING_URI``, which the CLI would otherwise follow."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh sparsebench home; the store is ``<home>/mlflow.db``."""
    path = tmp_path / "home"
    monkeypatch.setenv("SPARSEBENCH_HOME", str(path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("SPARSEBENCH_PLUGINS", raising=False)
    return path


@pytest.fixture(scope="session")
def schema_db(tmp_path_factory) -> Path:
    """An MLflow sqlite store with its tables and nothing else, created once per session."""
    from harness.store.client import open_client

    path = tmp_path_factory.mktemp("schema") / "mlflow.db"
    open_client(f"sqlite:///{path}", create=True)
    return path


@pytest.fixture
def seeded(schema_db):  # -> Callable[[Path], Path]
    """Put an empty store into a home folder: a copy of ``schema_db`` spares each test the seconds
    MLflow's schema migrations take (tests of a fresh store use ``home`` as it is)."""

    def seed(home: Path) -> Path:
        home.mkdir(parents=True, exist_ok=True)
        shutil.copy(schema_db, home / "mlflow.db")
        return home

    return seed


@pytest.fixture
def store_home(home, seeded) -> Path:
    return seeded(home)


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """Write modules (name -> source) into a folder on sys.path; forget them afterwards."""
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    written: list[str] = []

    def write(name: str, source: str) -> Path:
        path = folder / f"{name}.py"
        path.write_text(textwrap.dedent(source))
        written.append(name)
        return folder

    yield write
    for name in written:
        sys.modules.pop(name, None)


@pytest.fixture
def third_party(plugin_dir) -> str:
    plugin_dir("sb_third_party", THIRD_PARTY)
    return "sb_third_party"


@pytest.fixture
def store(home) -> Store:
    return Store(home)


@pytest.fixture
def store_at():  # -> type[Store]; for tests that compare several homes
    return Store


@pytest.fixture
def probe(plugin_dir, monkeypatch) -> Path:
    """The ``sparse_probe`` estimator plugin (module ``sb_probe``); returns its folder, which a
    subprocess needs on its PYTHONPATH."""
    monkeypatch.delenv("SB_PROBE_SLEEP", raising=False)
    monkeypatch.delenv("SB_PROBE_SIGNAL", raising=False)
    return plugin_dir("sb_probe", PROBE)


class Store:
    """Read-side helpers on a sparsebench home's sqlite store."""

    def __init__(self, home: Path, experiment: str = "sparsebench-quick") -> None:
        self.home = home
        self.uri = f"sqlite:///{home / 'mlflow.db'}"
        self.experiment = experiment

    @property
    def client(self):  # -> MlflowClient; opened on first use, so a fresh store stays absent until then
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)

    def runs(self, role: str):  # -> list[mlflow.entities.Run]
        found = self.client.get_experiment_by_name(self.experiment)
        if found is None:
            return []
        return self.client.search_runs(
            [found.experiment_id], f"tags.`sparsebench.role` = '{role}'", order_by=["attributes.start_time"]
        )

    def cell(self):  # -> mlflow.entities.Run, the only cell run
        runs = self.runs("cell")
        assert len(runs) == 1, [r.info.run_name for r in runs]
        return runs[0]

    def history(self, run_id: str) -> dict[str, list[tuple[int, float]]]:
        """Every metric's (step, value) pairs by step, wall-clock metrics left out; a step
        logged twice shows twice."""
        keys = self.client.get_run(run_id).data.metrics
        return {
            key: sorted((m.step, m.value) for m in self.client.get_metric_history(run_id, key))
            for key in sorted(keys)
            if not key.startswith(("time/", "summary/"))
        }

    def checkpoints(self) -> list[Path]:
        folder = self.home / "checkpoints"
        return sorted(folder.glob("*.pt")) if folder.exists() else []
