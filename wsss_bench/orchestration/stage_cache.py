"""Cached stages: hash the inputs, look up the shared store, honour ``--force``, record, link.

Every expensive step of a run (training a classifier, extracting features, inferring a split's
CAMs) is a *stage*: a name such as ``train:round1``, a digest of everything its output depends
on, and an output (one file, or a folder of files).  :class:`StageCache` holds what is common
to all of them, so a step only says what its inputs are and how to compute its output:

* the content-addressed **store** shared between runs (``wsss bench`` cells, ``--cache-dir``):
  an output whose inputs hash to a stored key is linked in rather than recomputed, and a new
  output is linked into the store for the next run;
* **--force**: stage names or prefixes (``train:round1``, ``cams``) recomputed even when cached;
* the run **manifest**: each finished stage with its inputs, outputs, time and whether it was
  reused.

Which process computes (rank 0, or every rank on its shard) stays with the caller: the cache
touches files only where it is called.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from .. import io
from .manifest import Manifest

#: The marker a complete stored folder holds (a folder is linked file by file).
COMPLETE = "complete"


def digest(obj: Any) -> str:
    """A short stable hash of a JSON-able object or numpy array."""
    h = hashlib.sha256()
    if isinstance(obj, np.ndarray):
        h.update(str(obj.dtype).encode() + str(obj.shape).encode())
        h.update(np.ascontiguousarray(obj).tobytes())
    else:
        h.update(json.dumps(obj, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


@dataclass
class StageCache:
    """The store, the forced stages and the manifest of one run."""

    store: Optional[Path] = None
    force: tuple[str, ...] = ()
    manifest: Optional[Manifest] = None

    def forced(self, stage: str) -> bool:
        """Whether ``stage`` (e.g. ``train:round1``) must be recomputed."""
        return any(stage == f or stage.startswith(f + ":") for f in self.force)

    def stage(self, name: str, kind: str, key_inputs: Any, suffix: str = "",
              record: Optional[dict[str, Any]] = None) -> "Stage":
        """Open stage ``name``: its key is the digest of ``key_inputs``; its stored copy lives
        under ``store/<kind>/<key><suffix>``; ``record`` is what the manifest notes as its
        inputs (default: ``key_inputs``)."""
        key = digest(key_inputs)
        stored = self.store / kind / f"{key}{suffix}" if self.store is not None else None
        return Stage(self, name, key, stored, self.forced(name),
                     key_inputs if record is None else record)


@dataclass
class Stage:
    """One stage of a run, opened by :meth:`StageCache.stage`."""

    cache: StageCache
    name: str
    key: str
    #: Where the store keeps (or will keep) this output; None without a store.
    stored: Optional[Path]
    forced: bool
    inputs: Any
    started: float = field(default_factory=time.perf_counter)
    paused: Optional[float] = None

    def pause(self) -> None:
        """Stop this stage's clock while other work runs (another split's CAMs, inferred before
        this split is scored), so the manifest's time is this stage's own."""
        self.paused = time.perf_counter()

    def resume(self) -> None:
        """Restart the clock :meth:`pause` stopped."""
        if self.paused is not None:
            self.started += time.perf_counter() - self.paused
            self.paused = None

    def stored_file(self) -> bool:
        """Whether the store holds this stage's file and it may be used."""
        return self.stored is not None and self.stored.is_file() and not self.forced

    def stored_folder(self) -> bool:
        """Whether the store holds this stage's complete folder and it may be used."""
        return self.stored is not None and (self.stored / COMPLETE).is_file() and not self.forced

    def fetch_file(self, target: Path) -> bool:
        """Link the stored file to ``target`` when usable and ``target`` is absent."""
        if self.stored_file() and not target.is_file():
            link_file(self.stored, target)  # type: ignore[arg-type]
            return True
        return False

    def fetch_folder(self, target: Path, pattern: str = "*.npz") -> bool:
        """Link every ``pattern`` file of the stored folder into ``target`` when it is usable."""
        if self.stored_folder():
            link_tree(self.stored, target, pattern)  # type: ignore[arg-type]
            return True
        return False

    def publish_file(self, output: Path) -> None:
        """Link ``output`` into the store (when there is one)."""
        if self.stored is not None:
            link_file(output, self.stored)

    def publish_folder(self, output: Path, pattern: str = "*.npz") -> None:
        """Publish ``output``'s ``pattern`` files as the stored folder (:func:`publish_tree`)."""
        if self.stored is not None and not (self.stored / COMPLETE).is_file():
            publish_tree(output, self.stored, pattern)

    def record(self, outputs: list[Path], reused: bool = False,
               known: Optional[Mapping[Path, str]] = None) -> None:
        """Add the finished stage to the run manifest (when there is one); ``known`` holds
        SHA-256s already taken of output files, which are then not read again."""
        self.resume()
        if self.cache.manifest is not None:
            self.cache.manifest.stage(self.name, self.inputs, outputs,
                                      time.perf_counter() - self.started, reused, known)


def unique_suffix() -> str:
    """A temporary name's part no other writer has: host, pid and a random token (processes
    on two machines sharing a store may have the same pid)."""
    return f"{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}"


def link_file(source: Path, target: Path) -> None:
    """Hard-link ``source`` to ``target`` (copy across file systems); never half-written."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{unique_suffix()}.link")
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def link_tree(source: Path, target: Path, pattern: str = "*.npz") -> None:
    """Link every ``pattern`` file of ``source`` (CAM files by default) into ``target``."""
    for path in source.glob(pattern):
        if not (target / path.name).is_file():
            link_file(path, target / path.name)


def publish_tree(source: Path, stored: Path, pattern: str = "*.npz") -> None:
    """Make ``stored`` a complete copy of ``source``'s ``pattern`` files by one rename.

    The folder is assembled under a temporary name unique to this writer, marked complete, then
    renamed into place, so a reader sees no folder or a finished one, and two writers of the same
    stage (two cells, two machines on one shared store) never leave a mixed entry: the first
    rename wins and the other writer's copy is dropped.  An entry left incomplete by a writer of
    the earlier file-by-file layout is set aside and replaced.
    """
    stored.parent.mkdir(parents=True, exist_ok=True)
    tmp = stored.with_name(f".{stored.name}.{unique_suffix()}.tmp")
    try:
        link_tree(source, tmp, pattern)
        io.write_text(tmp / COMPLETE, "")
        try:
            os.rename(tmp, stored)   # onto nothing, or onto an empty folder
            return
        except OSError:
            if (stored / COMPLETE).is_file():
                return               # another writer published it first; theirs stands
        stale = stored.with_name(f".{stored.name}.{unique_suffix()}.stale")
        try:
            os.rename(stored, stale)
            os.rename(tmp, stored)
        except OSError:
            return                   # another writer is replacing it at the same moment
        shutil.rmtree(stale, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
