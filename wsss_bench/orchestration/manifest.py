"""The run manifest: everything needed to know what produced a run directory.

``manifest.json`` holds the resolved config and its hash, package version and git commit, the
loaded plugins with their distribution versions, torch / CUDA versions, device, seed, dataset
identity (checksums of the split lists) and, for every stage, its inputs and the checksums of
its outputs.  It is rewritten atomically after every stage, so a crashed run still says how
far it got.
"""
from __future__ import annotations

import hashlib
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import torch

from .. import __version__, io
from ..config import RunConfig
from ..data.voc import SPLIT_DIR, VOCDataset
from ..io import file_sha256
from ..plugins import plugin_infos

MANIFEST = "manifest.json"


def tree_sha256(paths: Iterable[Path], known: Optional[Mapping[Path, str]] = None) -> str:
    """One checksum over many files (names and contents, in sorted order).

    ``known`` holds SHA-256s already taken of some of the files (e.g. by scoring, which hashes
    the CAM bytes it reads); those files are not read again.
    """
    known = known or {}
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(path.name.encode())
        h.update((known.get(path) or file_sha256(path)).encode())
    return h.hexdigest()


def git_commit() -> Optional[str]:
    """The commit of the source checkout wsss-bench runs from, when it is one."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def dataset_identity(datasets: dict[str, VOCDataset]) -> dict[str, Any]:
    """Root, class names and split-list checksums of the datasets used."""
    identity: dict[str, Any] = {}
    for role, ds in datasets.items():
        listing = ds.root / SPLIT_DIR / f"{ds.split}.txt"
        identity[role] = {"root": str(ds.root), "split": ds.split, "images": len(ds.ids),
                          "split_sha256": file_sha256(listing) if listing.is_file() else None,
                          "ids_sha256": hashlib.sha256("\n".join(ds.ids).encode()).hexdigest()}
    first = next(iter(datasets.values()), None)
    if first is not None:
        identity["class_names"] = first.class_names
    return identity


class Manifest:
    """Collects run metadata and stage records; saves itself atomically."""

    def __init__(self, run_dir: Path, config: RunConfig, device: torch.device,
                 datasets: dict[str, VOCDataset]) -> None:
        self.path = Path(run_dir) / MANIFEST
        self.data: dict[str, Any] = {
            "format": "wsss_bench.manifest/1",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": config.to_dict(), "config_sha256": config.digest(),
            "wsss_bench": {"version": __version__, "git_commit": git_commit()},
            "plugins": [{"name": p.name, "distribution": p.distribution, "version": p.version,
                         "registers": p.registered} for p in plugin_infos()],
            "environment": {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda": torch.version.cuda, "platform": platform.platform(),
                            "threads": torch.get_num_threads()},
            "device": str(device), "seed": config.seed,
            "dataset": dataset_identity(datasets),
            "stages": [],
            "status": "running",
        }

    def stage(self, name: str, inputs: dict[str, Any], outputs: list[Path], seconds: float,
              reused: bool = False, known: Optional[Mapping[Path, str]] = None) -> None:
        """Record one finished stage and save (``known``: see :func:`tree_sha256`)."""
        files = [p for out in outputs for p in (sorted(out.rglob("*")) if out.is_dir() else [out])
                 if p.is_file()]
        self.data["stages"].append({
            "name": name, "inputs": inputs, "reused": reused, "seconds": round(seconds, 3),
            "outputs": [str(o.relative_to(self.path.parent)) if o.is_relative_to(self.path.parent) else str(o)
                        for o in outputs],
            "files": len(files), "sha256": tree_sha256(files, known) if files else None,
        })
        self.save()

    def finish(self, status: str = "complete") -> None:
        """Mark the run finished."""
        self.data["status"] = status
        self.save()

    def save(self) -> None:
        """Write ``manifest.json`` atomically."""
        io.write_json(self.path, self.data)
