"""Plugin discovery through the real paths: built-ins, entry points, --plugin, the env var."""

from __future__ import annotations

import pytest

from harness import plugins
from harness.cli import main
from harness.errors import PluginError

ENTRY_POINT_PLUGIN = """
from estimators.base import Estimator, SparseMatrixSpec, StructureLayer, hookimpl
import torch
from torch import nn


class Half(StructureLayer):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        return self.w * x


class HalfEstimator(Estimator):
    name = "half"
    description = "from an installed distribution"
    kinds = frozenset({"sparse_matrix"})

    def build(self, spec, params):
        return Half()


@hookimpl
def register_estimators(register):
    register(HalfEstimator())
"""


@pytest.fixture
def installed(plugin_dir, tmp_path):
    """A distribution 'sb-half 1.2.3' with an entry point in group 'sparsebench', on sys.path."""
    folder = plugin_dir("sb_half", ENTRY_POINT_PLUGIN)
    info = folder / "sb_half-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sb-half\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text("[sparsebench]\nhalf = sb_half\n")
    return folder


def test_builtins_register_every_task_and_estimator():
    registry = plugins.load()
    assert set(registry.tasks) == {"identity", "attention", "sorting"}
    assert set(registry.estimators) >= {"sparse", "reinforce", "gumbel_sinkhorn", "dense", "bilinear"}
    assert registry.tasks["identity"].source == "built-in"
    assert registry.tasks["identity"].plugin == "plugins.identity"


def test_entry_point_plugin_is_found_and_runs_in_the_matrix(installed, home, capsys):
    registry = plugins.load()
    assert registry.estimators["half"].source == "sb-half 1.2.3"
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "sb-half 1.2.3" in out and "estimator:half" in out
    code = main(["run", "--task", "identity", "--estimator", "half", "--set", "tasks.identity.steps=5",
                 "--set", "tasks.identity.variants=[{n = 4}]", "--no-progress"])
    assert code == 0
    assert "identity/n=4/half/seed=0" in capsys.readouterr().out


def test_plugin_option_and_env_var(third_party, monkeypatch):
    assert plugins.load([third_party]).estimators["scaled"].source == f"module {third_party}"
    monkeypatch.setenv("SPARSEBENCH_PLUGINS", third_party)
    assert "scaled" in plugins.load().estimators


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("import no_such_dependency_xyz\n", "failed to import: ModuleNotFoundError"),
        (
            "from estimators.base import hookimpl\n@hookimpl\ndef register_estimators(register):\n"
            "    register(object())\n",
            "which is not an estimators.base.Estimator",
        ),
        (
            "from estimators.base import hookimpl\nfrom estimators.plugins.dense import DenseEstimator\n"
            "@hookimpl\ndef register_estimators(register):\n    register(DenseEstimator())\n",
            "registers 'dense', already registered by plugin 'estimators.plugins.dense' (built-in)",
        ),
        (
            "from estimators.base import hookimpl\n@hookimpl\ndef register_estimators(registr):\n    pass\n",
            "is invalid",
        ),
        (
            "from estimators.base import Estimator, hookimpl\n"
            "class E(Estimator):\n    kinds = frozenset({'x'})\n"
            "@hookimpl\ndef register_estimators(register):\n    register(E())\n",
            "without a name",
        ),
    ],
    ids=["import-error", "not-an-estimator", "duplicate-name", "bad-hook-signature", "missing-name"],
)
def test_broken_plugin_is_one_line_naming_it(plugin_dir, home, capsys, source, message):
    plugin_dir("sb_broken", source)
    with pytest.raises(PluginError, match="sb_broken"):
        plugins.load(["sb_broken"])
    assert main(["run", "--plugin", "sb_broken", "--task", "identity"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "sb_broken" in err and "module sb_broken" in err and message in err
    assert not (home / "mlflow.db").exists()


def test_list_shows_cells_and_na_reasons(capsys):
    assert main(["list", "--preset", "quick"]) == 0
    out = capsys.readouterr().out
    assert "attention" in out and "gumbel_sinkhorn" in out
    assert "n/a" in out
