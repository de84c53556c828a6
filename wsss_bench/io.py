"""Atomic file output: write to a temporary sibling, then rename into place.

A crash or a full disk leaves either the old file or no file, never a truncated one.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, BinaryIO

import numpy as np
import yaml

from .errors import FileSystemError, describe_os_error


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_open(path: Path) -> Iterator[BinaryIO]:
    """Open a temporary file next to ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise FileSystemError(describe_os_error(exc, path.parent, "cannot write output")) from None
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise FileSystemError(describe_os_error(exc, path, "cannot write output")) from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_bytes(path: Path, data: bytes | memoryview) -> None:
    """Atomically write ``data`` to ``path``."""
    with atomic_open(path) as handle:
        handle.write(data)


def write_text(path: Path, text: str) -> None:
    """Atomically write UTF-8 ``text`` to ``path``."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON (NaN written as null)."""
    write_text(path, json.dumps(_json_safe(obj), indent=2, sort_keys=False) + "\n")


def write_yaml(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as YAML."""
    write_text(path, yaml.safe_dump(_json_safe(obj), sort_keys=False))


def write_npz(path: Path, **arrays: np.ndarray) -> None:
    """Atomically write an uncompressed ``.npz`` (never pickled)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_bytes(path, buffer.getvalue())


def read_npz(path: Path | BinaryIO) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` archive (a path, or bytes in a binary file object), read
    without unpickling anything.

    Raises ``ValueError`` for a file that is not such an archive (a pickle, or a single ``.npy``
    array saved under an ``.npz`` name), ``OSError`` / ``zipfile.BadZipFile`` / ``EOFError``
    for unreadable bytes.
    """
    if not isinstance(path, (str, os.PathLike)):
        return _read_npz_handle(path)
    # Our own handle: np.load leaks the one it opens when the zip directory is corrupt.
    with open(path, "rb") as handle:
        return _read_npz_handle(handle)


def _read_npz_handle(handle: BinaryIO) -> dict[str, np.ndarray]:
    data = np.load(handle, allow_pickle=False)
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError("a single .npy array saved under an .npz name, not an .npz archive")
    with data:
        return {name: data[name] for name in data.files}


def write_with(path: Path, writer: Callable[[BinaryIO], None]) -> None:
    """Atomically write ``path`` with ``writer(handle)`` (e.g. ``torch.save``)."""
    with atomic_open(path) as handle:
        writer(handle)


def write_torch(path: Path, obj: Any) -> None:
    """Atomically ``torch.save`` ``obj`` to ``path``.

    Serialised in memory first: torch's zip writer turns a failed write (full disk, read-only
    file system) into a ``RuntimeError`` that names neither the file nor the cause, while a
    plain write raises the ``OSError`` that :func:`atomic_open` reports as one line.
    """
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getbuffer())


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _json_safe(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return None if value != value or value in (float("inf"), float("-inf")) else value
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj
