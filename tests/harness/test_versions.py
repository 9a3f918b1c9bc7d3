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
