"""The conformance suite from a plugin's own tests (pytest), as ``sparsebench check-plugin`` runs it.

    from harness.testing import assert_conforms

    def test_estimator_conforms():
        assert_conforms(MyEstimator())   # layer checks, then a few steps on every built-in task

    def test_installed_plugin_conforms():
        assert_conforms("my_plugin")     # everything the installed plugin registers

Or as a fixture: put ``pytest_plugins = ["harness.testing"]`` in ``conftest.py`` and take
``sparsebench_check`` (the same function). A failure raises ``AssertionError`` holding the whole
report, so pytest shows every check, not only the first that failed.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence

import pytest
import torch

from estimators.base import Estimator
from harness import plugins
from harness.plugins import conformance
from harness.plugins.versions import code_version
from harness.task import Task

__all__ = ["DEVICES", "assert_conforms", "sparsebench_check"]

# What numerical tests parametrise over: the CPU always, CUDA where a GPU is present (a visible
# skip otherwise, so a CPU-only run says what it did not check).
DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
    ),
]


def assert_conforms(
    target: str | Estimator | Task, plugins_: Sequence[str] = (), train: bool = True
) -> conformance.Report:
    """Check a plugin (by name, as ``check-plugin NAME``), an ``Estimator`` or a ``Task``.

    ``plugins_`` are extra ``--plugin`` values for loading by name. ``train=False`` leaves out the
    training steps on the built-in tasks (seconds instead of tens of seconds). Returns the report.
    """
    registry = plugins.load(plugins_)
    if isinstance(target, str):
        if not train:
            raise ValueError("train=False applies to an Estimator or Task object, not a plugin name")
        report = conformance.check_plugin(registry, target)
    else:
        started = time.perf_counter()
        builtin = set(plugins.DEFAULT_PLUGINS)
        if isinstance(target, Estimator):
            tasks = [r.obj for r in registry.tasks.values() if r.plugin in builtin] if train else []
            checks = conformance.check_estimator(target, tasks)
        else:
            ests = [r.obj for r in registry.estimators.values() if r.plugin in builtin] if train else []
            checks = conformance.check_task(target, ests)
        name = getattr(target, "name", type(target).__name__)
        module = type(target).__module__
        source = f"{type(target).__name__} from {module}"
        report = conformance.Report(name, source, code_version(sys.modules[module]), checks)
        report.seconds = time.perf_counter() - started
    if not report.ok:
        raise AssertionError("\n" + report.text())
    return report


@pytest.fixture
def sparsebench_check() -> Callable[..., conformance.Report]:
    """``assert_conforms``, for tests that prefer a fixture."""
    return assert_conforms
