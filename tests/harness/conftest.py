"""Fixtures for harness tests: a tmp sparsebench home (real sqlite MLflow store) and a way to
write third-party plugin modules into a tmp folder on ``sys.path``."""

from __future__ import annotations

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


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh sparsebench home; the store is ``<home>/mlflow.db``."""
    path = tmp_path / "home"
    monkeypatch.setenv("SPARSEBENCH_HOME", str(path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("SPARSEBENCH_PLUGINS", raising=False)
    return path


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
