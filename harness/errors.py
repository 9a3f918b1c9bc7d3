"""Errors the CLI reports as one line and exit code 2: the user can fix them by changing input."""

from __future__ import annotations

__all__ = ["ConfigError", "PluginError", "TrackingError", "UsageError"]


class UsageError(Exception):
    """Bad input: the message names the bad thing and says what to do."""


class ConfigError(UsageError):
    """An unknown or badly typed config key, preset, task, estimator or size."""


class PluginError(UsageError):
    """A plugin that cannot be loaded or registers something invalid; names plugin and source."""


class TrackingError(UsageError):
    """The tracking store or server cannot be reached."""
