"""Exceptions that separate user mistakes from bugs.

Anything a user can cause (a bad path, a bad config value, an unknown plugin, a malformed file)
raises :class:`UserError` or a subclass.  The CLI prints its message on one line and exits with
status 2; every other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import errno
from typing import Optional


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


class FileSystemError(UserError):
    """A file the file system refused: name too long, disk full, read-only, no permission."""


#: Causes said the way a user fixes them (the rest keep the system's own wording).
_OS_CAUSES = {
    errno.ENAMETOOLONG: "file name too long for the file system",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def describe_os_error(exc: OSError, path: Optional[object] = None, action: str = "") -> str:
    """``<file>: [<action> (]<cause>[)]`` for an ``OSError``.

    ``path`` names the file (else the error's own file name): a writer passes its target, not
    the temporary file it was writing.
    """
    cause = _OS_CAUSES.get(exc.errno or -1) or exc.strerror or str(exc) or type(exc).__name__
    said = f"{action} ({cause})" if action else cause
    where = path if path is not None else exc.filename
    if where is None:
        return said
    text = str(where)
    if len(text) > 160:  # a name over the limit is unreadable in full; its start and end say enough
        text = f"{text[:100]}...{text[-40:]} ({len(text)} characters)"
    return f"{text}: {said}"
