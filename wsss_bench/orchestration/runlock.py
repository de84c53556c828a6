"""One writer per run folder: an advisory lock held while a process writes the folder.

``RUN/.wsss-run.lock`` is locked with ``flock`` for as long as a process writes ``RUN``.  The
kernel releases the lock when its holder exits, however it exits (SIGKILL included), so a lock
left by a killed process is never mistaken for a live one: the file stays, the lock does not.
The file holds the holder's host, pid, start time and command, which is what a second writer is
told.  The file is never deleted (deleting it while another process opens it would let two
processes lock two different files); it also marks the folder as a wsss run folder.

Where ``flock`` is unavailable (Windows) locking is skipped with no error.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Optional

from ..errors import UserError

log = logging.getLogger("wsss_bench")

LOCK_NAME = ".wsss-run.lock"

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

#: Folders this process holds: resolved path -> (file descriptor, nesting count).
_held: dict[Path, list[int]] = {}


class RunFolderLocked(UserError):
    """Another live process is writing the run folder."""


def is_run_folder(folder: Path) -> bool:
    """Whether ``folder`` was made by wsss (it has a lock file or a run manifest)."""
    return (Path(folder) / LOCK_NAME).is_file() or (Path(folder) / "manifest.json").is_file()


def mark_run_folder(folder: Path) -> None:
    """Create ``folder`` as a wsss run folder (its lock file, unlocked) so it may be resumed."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).touch(exist_ok=True)


def _holder(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 1 << 16)
    try:
        found = json.loads(raw.decode() or "{}")
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return found if isinstance(found, dict) else {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "another process"
    started = holder.get("started")
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return (f"process {holder.get('pid', '?')} on {holder.get('host', '?')} since {since} "
            f"({holder.get('command', '?')})")


def acquire(folder: Path) -> None:
    """Lock ``folder`` for this process, or raise :class:`RunFolderLocked` naming the holder.

    Re-entrant within one process (each ``acquire`` needs its :func:`release`).
    """
    folder = Path(folder)
    key = folder.resolve()
    if key in _held:
        _held[key][1] += 1
        return
    if fcntl is None:  # pragma: no cover
        return
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise RunFolderLocked(f"{folder}: in use by {_describe(holder)}; wait for it to finish or "
                              "choose another --out") from None
    except OSError:  # a file system without locks: carry on unlocked rather than refuse to run
        os.close(fd)
        log.warning("%s: the file system does not support locks; two runs writing this folder "
                    "at once would not be detected", folder)
        return
    previous = _holder(fd)
    if previous.get("pid"):
        # Written by a process that no longer holds the lock: it died without releasing.
        log.info("%s: taking over from %s, which has ended", folder, _describe(previous))
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
          "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(me) + "\n").encode())
    _held[key] = [fd, 1]


def release(folder: Path) -> None:
    """Undo one :func:`acquire` of ``folder``; the last one unlocks it."""
    key = Path(folder).resolve()
    entry = _held.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] > 0:
        return
    del _held[key]
    fd = entry[0]
    try:
        os.ftruncate(fd, 0)  # an empty file: nobody holds it
    except OSError:
        pass
    os.close(fd)  # closing the descriptor releases the flock


def release_all() -> None:
    """Unlock every folder this process holds (the end of a CLI command)."""
    for key in list(_held):
        _held[key][1] = 1
        release(key)


def held(folder: Optional[Path] = None) -> bool:
    """Whether this process holds ``folder`` (any folder when ``None``)."""
    return bool(_held) if folder is None else Path(folder).resolve() in _held
