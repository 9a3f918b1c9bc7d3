"""Plugin discovery through the real paths: built-ins, entry points, --plugin, the env var."""

from __future__ import annotations

import sys

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
    assert set(registry.tasks) == {
        "identity", "attention", "sorting", "study_permutation", "study_matrix", "study_glimpse"
    }
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
                 "--set", "tasks.identity.variants=[{n = 4}]", "--set", "tuning.trials=0", "--no-progress"])
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
        (
            "from estimators.base import hookimpl\nfrom estimators.plugins.dense import DenseEstimator\n"
            "class E(DenseEstimator):\n    name = 'has space/slash'\n"
            "@hookimpl\ndef register_estimators(register):\n    register(E())\n",
            "registered an estimator named 'has space/slash'; names must match [a-z][a-z0-9_]*",
        ),
        (
            "from estimators.base import hookimpl\nfrom plugins.identity import IdentityTask\n"
            "class T(IdentityTask):\n    name = 'Mine'\n"
            "@hookimpl\ndef register_tasks(register):\n    register(T())\n",
            "registered a task named 'Mine'; names must match [a-z][a-z0-9_]*",
        ),
    ],
    ids=["import-error", "not-an-estimator", "duplicate-name", "bad-hook-signature", "missing-name",
         "bad-estimator-name", "bad-task-name"],  # fmt: skip
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
    assert main(["list", "--plugin", "sb_broken"]) == 2  # list loads the same way
    assert message in capsys.readouterr().err


def test_list_shows_cells_and_na_reasons(capsys):
    assert main(["list", "--preset", "quick"]) == 0
    out = capsys.readouterr().out
    assert "attention" in out and "gumbel_sinkhorn" in out
    assert "n/a" in out


# ---- strict loading: what a plugin author gets wrong first ---------------------------------------

TWO_LINE_ESTIMATOR = """
from estimators.base import Estimator, hookimpl
from estimators.plugins.dense import DenseEstimator


class Mine(DenseEstimator):
    name = "mine"
"""


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (
            TWO_LINE_ESTIMATOR + "@hookimpl\ndef register_estimator(register):\n    register(Mine())\n",
            "plugin 'sb_typo' (module sb_typo) implements unknown hook 'register_estimator'; "
            "did you mean 'register_estimators'?",
        ),
        (
            TWO_LINE_ESTIMATOR + "def register_estimators(register):\n    register(Mine())\n",
            "plugin 'sb_typo' (module sb_typo) defines register_estimators() without @hookimpl, "
            "so it would never be called",
        ),
        (
            TWO_LINE_ESTIMATOR + "def register_estimator(register):\n    register(Mine())\n",
            "defines register_estimator() without @hookimpl, so it would never be called; decorate "
            "it with `from estimators.base import hookimpl` (and did you mean 'register_estimators'?)",
        ),
    ],
    ids=["misspelt-hook", "unmarked-hook", "unmarked-and-misspelt"],
)
def test_hook_mistakes_are_errors_naming_the_plugin(plugin_dir, home, capsys, source, message):
    plugin_dir("sb_typo", source)
    assert main(["list", "--plugin", "sb_typo"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert message in err


def test_a_helper_function_is_not_mistaken_for_a_hook(plugin_dir):
    plugin_dir("sb_helper", TWO_LINE_ESTIMATOR + "def build_layers():\n    return []\n"
               "@hookimpl\ndef register_estimators(register):\n    register(Mine())\n")
    assert "mine" in plugins.load(["sb_helper"]).estimators


def test_plugin_option_finds_modules_in_the_working_folder(tmp_path, monkeypatch, home, capsys):
    """The console script does not put the working folder on sys.path; --plugin does."""
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "sb_local_estimator.py").write_text(
        TWO_LINE_ESTIMATOR + "@hookimpl\ndef register_estimators(register):\n    register(Mine())\n"
    )
    monkeypatch.chdir(folder)
    monkeypatch.setattr("sys.path", [p for p in sys.path if p not in ("", ".", str(folder))])
    try:
        assert main(["plugins", "--plugin", "sb_local_estimator"]) == 0
        assert "estimator:mine" in capsys.readouterr().out
    finally:
        sys.modules.pop("sb_local_estimator", None)


def test_a_module_loaded_twice_is_one_line_and_loaded_once(installed, home, capsys):
    assert main(["plugins", "--plugin", "sb_half"]) == 0
    captured = capsys.readouterr()
    assert captured.err.strip() == (
        "sparsebench: warning: plugin 'sb_half' (module sb_half) is the module already loaded as "
        "plugin 'half' (sb-half 1.2.3); loaded once"
    )
    assert captured.out.count("estimator:half") == 1


BROKEN_INSTALLED = "raise RuntimeError('this release is broken')\n"


@pytest.fixture
def broken_installed(plugin_dir):
    """An installed distribution 'sb-broken 0.3' whose entry point 'broken' fails on import."""
    folder = plugin_dir("sb_broken_dist", BROKEN_INSTALLED)
    info = folder / "sb_broken-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sb-broken\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text("[sparsebench]\nbroken = sb_broken_dist\n")
    return folder


@pytest.mark.parametrize("command", [["plugins"], ["list"], ["report"], ["check-plugin", "dense"]])
def test_a_broken_installed_plugin_says_how_to_switch_it_off(broken_installed, home, capsys, command):
    assert main(command) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "sparsebench: error: plugin 'broken' (sb-broken 0.3, sb_broken_dist) failed to load: "
        "RuntimeError: this release is broken; switch it off with -p no:broken or "
        "SPARSEBENCH_DISABLE_PLUGINS=broken"
    )


@pytest.mark.parametrize(
    "how",
    [["-p", "no:broken"], ["--plugin", "no:sb-broken"], "SPARSEBENCH_DISABLE_PLUGINS", "SPARSEBENCH_PLUGINS"],
    ids=["-p no:name", "--plugin no:distribution", "disable-env-var", "plugins-env-var"],
)
def test_a_switched_off_plugin_is_never_loaded(broken_installed, home, capsys, monkeypatch, how):
    if isinstance(how, str):
        monkeypatch.setenv(how, "no:broken" if how == "SPARSEBENCH_PLUGINS" else "broken")
        how = []
    assert main(["plugins", *how]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if "broken" in line)
    assert "switched off" in row
    assert "sb_broken_dist" not in sys.modules
    assert main(["list", "--task", "identity", "--estimator", "dense", *how]) == 0


def test_switching_off_an_unknown_name_is_a_warning(home, capsys):
    assert main(["plugins", "-p", "no:nosuchplugin"]) == 0
    assert capsys.readouterr().err.strip() == (
        "sparsebench: warning: no plugin named 'nosuchplugin' to switch off (see `sparsebench plugins`)"
    )


def test_plugins_lists_the_code_each_plugin_runs(installed, third_party, capsys):
    assert main(["plugins", "--plugin", third_party]) == 0
    out = capsys.readouterr().out
    half = next(line for line in out.splitlines() if "estimator:half" in line)
    assert "sb-half 1.2.3" in half.split("│")[3]  # an installed release: its version alone
    mine = next(line for line in out.splitlines() if "estimator:scaled" in line)
    assert "module sb_third_party src:" in mine  # a plain module: a hash of its sources
