"""The sparsebench host: hookspecs, plugin manager, config, matrix, runner, tracking and CLI.

Plugin authors need ``hookimpl`` (here) and the base classes ``harness.task.Task`` and
``estimators.base.Estimator``; this package stays light so that ``sparsebench --help`` is instant.
"""

from harness.errors import ConfigError, PluginError, TrackingError, UsageError
from harness.hookspecs import hookimpl

__all__ = ["ConfigError", "PluginError", "TrackingError", "UsageError", "hookimpl"]
