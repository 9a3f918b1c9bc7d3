"""Which code a plugin runs: a release is its version; anything else adds a hash of exactly the
modules the plugin imports from its own packages."""

from __future__ import annotations

import importlib
import sys

import pytest

from harness.plugins.versions import code_version


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A package ``sbv_pkg`` on sys.path: ``plugin`` imports ``layer`` (inside a function) and
    ``typing_only`` (for annotations only); ``other`` is not imported by it."""
    root = tmp_path / "sbv_pkg"
    root.mkdir()
    files = {
        "__init__.py": "",
        "plugin.py": (
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from sbv_pkg import typing_only\n"
            "def build():\n    from .layer import Layer\n    return Layer()\n"
        ),
        "layer.py": "class Layer:\n    scale = 1\n",
        "typing_only.py": "X = 1\n",
        "other.py": "Y = 1\n",
    }
    for name, text in files.items():
        (root / name).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield root
    for name in [m for m in sys.modules if m.startswith("sbv_pkg")]:
        sys.modules.pop(name)


def test_the_hash_covers_what_the_plugin_imports_and_nothing_else(package):
    plugin = importlib.import_module("sbv_pkg.plugin")
    first = code_version(plugin)
    assert first.startswith("module sbv_pkg.plugin src:")
    (package / "other.py").write_text("Y = 2\n")
    (package / "typing_only.py").write_text("X = 2\n")
    assert code_version(plugin) == first  # neither runs in the plugin
    (package / "layer.py").write_text("class Layer:\n    scale = 2\n")
    assert code_version(plugin) != first  # imported inside build(): part of the plugin's code


def test_a_wheel_install_is_its_version(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sbv_released.py").write_text("X = 1\n")
    info = site / "sbv_released-2.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sbv-released\nVersion: 2.0.1\n")
    (info / "RECORD").write_text("sbv_released.py,,\n")
    monkeypatch.syspath_prepend(str(site))
    from importlib import metadata

    dist = metadata.distribution("sbv-released")
    module = importlib.import_module("sbv_released")
    try:
        assert code_version(module, dist) == "sbv-released 2.0.1"
    finally:
        sys.modules.pop("sbv_released")


def test_a_source_tree_with_egg_info_is_not_a_release(tmp_path, monkeypatch):
    """A checkout that was once `pip install -e`d holds `<name>.egg-info` (no RECORD); run from that
    folder, the metadata found first is the egg-info, and its code must still carry the hash."""
    tree = tmp_path / "checkout"
    tree.mkdir()
    (tree / "sbv_tree.py").write_text("X = 1\n")
    info = tree / "sbv_tree.egg-info"
    info.mkdir()
    (info / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: sbv-tree\nVersion: 0.3.0\n")
    (info / "SOURCES.txt").write_text("sbv_tree.py\n")
    (info / "top_level.txt").write_text("sbv_tree\n")
    monkeypatch.syspath_prepend(str(tree))
    from importlib import metadata

    dist = metadata.distribution("sbv-tree")
    module = importlib.import_module("sbv_tree")
    try:
        assert code_version(module, dist).startswith("sbv-tree 0.3.0 src:")
    finally:
        sys.modules.pop("sbv_tree")


# ---- one identity per estimator; a stale release ------------------------------------------------

ESTIMATOR = '''
import torch
from torch import nn

from estimators.base import Estimator, StructureLayer


class Scaled(StructureLayer):
    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.2))

    def forward(self, x):
        return self.a * x


class {cls}(Estimator):
    name = "{name}"
    description = "test: W = a I"
    kinds = frozenset({{"sparse_matrix"}})

    def build(self, spec, params):
        return Scaled()
'''

PLUGIN = '''
from estimators.base import hookimpl
from {pkg}.est_a import EstA
from {pkg}.est_b import EstB


@hookimpl
def register_estimators(register):
    register(EstA())
    register(EstB())
'''


def _two_estimator_package(root, pkg: str) -> None:
    folder = root / pkg
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text("")
    (folder / "est_a.py").write_text(ESTIMATOR.format(cls="EstA", name=f"{pkg}_a"))
    (folder / "est_b.py").write_text(ESTIMATOR.format(cls="EstB", name=f"{pkg}_b"))
    (folder / "plugin.py").write_text(PLUGIN.format(pkg=pkg))


@pytest.fixture
def forget_modules():
    yield
    for name in [m for m in sys.modules if m.startswith(("sbv_multi", "sbv_rel"))]:
        sys.modules.pop(name)


def test_each_estimator_of_a_plugin_has_its_own_code(tmp_path, monkeypatch, forget_modules):
    """One plugin module registers two estimators, each in its own module: editing one changes
    its code (so its cells rerun) and leaves its sibling's alone."""
    from harness.plugins import load

    _two_estimator_package(tmp_path, "sbv_multi")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = load(["sbv_multi.plugin"])
    a, b = before.code("estimator", "sbv_multi_a"), before.code("estimator", "sbv_multi_b")
    package = before.version("sbv_multi.plugin")
    assert a.startswith("module sbv_multi.est_a src:") and a != b
    (tmp_path / "sbv_multi" / "est_a.py").write_text(
        ESTIMATOR.format(cls="EstA", name="sbv_multi_a") + "\n# edited\n")
    after = load(["sbv_multi.plugin"])
    assert after.code("estimator", "sbv_multi_a") != a
    assert after.code("estimator", "sbv_multi_b") == b
    assert after.version("sbv_multi.plugin") != package  # the plugin module's covers both


def test_a_release_reinstalled_with_other_code_warns_once(tmp_path, monkeypatch, forget_modules,
                                                          capsys):
    """A wheel install is identified by its version, so a reinstall with other code under the
    same version reuses the stored cells: one warning names the estimator and how to rerun."""
    from importlib import metadata

    from harness.cli import main
    from harness.plugins import versions

    site = tmp_path / "site"
    _two_estimator_package(site, "sbv_rel")
    info = site / "sbv_rel-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sbv-rel\nVersion: 1.0\n")
    files = ["__init__.py", "est_a.py", "est_b.py", "plugin.py"]
    (info / "RECORD").write_text("".join(f"sbv_rel/{f},,\n" for f in files))
    (info / "top_level.txt").write_text("sbv_rel\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("SPARSEBENCH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    versions._top_level_owners.cache_clear()
    assert metadata.distribution("sbv-rel").version == "1.0"
    tiny = ["run", "--task", "identity", "--estimator", "sbv_rel_a,sbv_rel_b", "--plugin",
            "sbv_rel.plugin", "--no-progress",
            "--set", "tasks.identity.variants=[{n = 4}]", "--set", "tasks.identity.steps=4",
            "--set", "tasks.identity.eval_every=4", "--set", "tasks.identity.eval_samples=50",
            "--set", "tuning.trials=0"]
    try:
        assert main(tiny) == 0
        assert main(tiny) == 0  # the same code: reused without a word
        assert "warning" not in capsys.readouterr().err
        (site / "sbv_rel" / "est_a.py").write_text(
            ESTIMATOR.format(cls="EstA", name="sbv_rel_a") + "\n# rebuilt, same version\n")
        assert main(tiny) == 0
        err = capsys.readouterr().err
        warnings = [line for line in err.splitlines() if "warning" in line]
        assert len(warnings) == 1, err
        assert warnings[0].startswith("sparsebench: warning: estimator sbv_rel_a: the installed code "
                                      "differs from the code that produced 1 finished cell(s)")
        assert "(sbv-rel 1.0)" in warnings[0] and "--force" in warnings[0]
        assert "bump the version" in warnings[0]
    finally:
        versions._top_level_owners.cache_clear()
