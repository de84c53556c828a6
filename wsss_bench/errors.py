"""Exceptions that separate user mistakes from bugs.

Anything a user can cause (a bad path, a bad config value, an unknown plugin, a malformed file)
raises :class:`UserError` or a subclass.  The CLI prints its message on one line and exits with
status 2; every other exception is a bug and keeps its traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; the message names the input at fault."""

    exit_code = 2


class ConfigError(UserError):
    """An invalid configuration file, key or value."""


class DataError(UserError):
    """A dataset on disk that cannot be read as the VOC layout expects."""


class PluginError(UserError):
    """An unknown, duplicate or broken plugin component."""


class WeightsError(UserError):
    """A weights or checkpoint file that cannot be loaded as asked."""


class CamFileError(UserError):
    """A CAM file that does not follow the documented ``.npz`` format."""
