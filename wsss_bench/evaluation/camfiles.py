"""The CAM file format: one ``<id>.npz`` per image, never a pickle.

* ``keys``: integer array ``[n]``, the 0-based foreground class ids present in the image;
* ``cams``: float array ``[n, H, W]`` at image resolution, each map normalised to ``[0, 1]``.

``cams[i]`` is the map of class ``keys[i]``; background is not stored (it comes from the
threshold policy at evaluation time).
"""
from __future__ import annotations

import hashlib
import io as _io
import json
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np

from .. import io
from ..errors import CamFileError

RANGE_TOLERANCE = 1e-3


def write_cam(path: Path, keys: np.ndarray, cams: np.ndarray) -> None:
    """Atomically write one CAM file (float32 maps, int64 keys); non-finite maps are refused."""
    maps = np.asarray(cams, np.float32)
    if not np.isfinite(maps).all():
        # A NaN map would only fail later, at scoring, naming this file; say where it came from.
        raise CamFileError(f"{path}: the model produced NaN or infinite CAMs (a diverged or damaged "
                           "classifier); the file was not written")
    io.write_npz(Path(path), keys=np.asarray(keys, np.int64), cams=maps)


def read_cam(path: Path, num_classes: Optional[int] = None,
             size: Optional[tuple[int, int]] = None) -> tuple[np.ndarray, np.ndarray]:
    """Read and validate one CAM file; ``size`` is the image's (H, W) when known."""
    keys, cams, _ = read_cam_with_digest(path, num_classes, size)
    return keys, cams


def read_cam_with_digest(path: Path, num_classes: Optional[int] = None,
                         size: Optional[tuple[int, int]] = None) -> tuple[np.ndarray, np.ndarray, str]:
    """:func:`read_cam` plus the file's SHA-256, from one read of its bytes.

    Scoring hashes what it parses, so a folder's checksum record (:func:`record_checksums`)
    costs no second pass over the files.
    """
    path = Path(path)
    if not path.is_file():
        raise CamFileError(f"{path}: CAM file missing")
    try:
        data = path.read_bytes()
        arrays = io.read_npz(_io.BytesIO(data))
    except ValueError as exc:  # object arrays need pickle, which we refuse; or a bare .npy
        raise CamFileError(f"{path}: not a plain array archive ({exc}); convert legacy or pickled "
                           "CAMs with `wsss import`") from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise CamFileError(f"{path}: unreadable CAM file ({exc})") from None
    if not {"keys", "cams"} <= set(arrays):
        raise CamFileError(f"{path}: expected arrays 'keys' and 'cams', found {sorted(arrays)}")
    keys, cams = arrays["keys"], arrays["cams"]
    if keys.ndim != 1 or not np.issubdtype(keys.dtype, np.integer):
        raise CamFileError(f"{path}: 'keys' must be a 1-D integer array, got {keys.dtype} {keys.shape}")
    if cams.ndim != 3 or not np.issubdtype(cams.dtype, np.floating):
        raise CamFileError(f"{path}: 'cams' must be a float array [n, H, W], got {cams.dtype} {cams.shape}")
    if cams.shape[0] != keys.shape[0]:
        raise CamFileError(f"{path}: {keys.shape[0]} keys but {cams.shape[0]} maps")
    if len(np.unique(keys)) != len(keys):
        raise CamFileError(f"{path}: duplicate class ids in 'keys'")
    if num_classes is not None and keys.size and (keys.min() < 0 or keys.max() >= num_classes):
        raise CamFileError(f"{path}: class ids {keys.tolist()} outside 0..{num_classes - 1}")
    if size is not None and cams.shape[0] and tuple(cams.shape[1:]) != tuple(size):
        raise CamFileError(f"{path}: maps are {cams.shape[2]}x{cams.shape[1]} but the image is "
                           f"{size[1]}x{size[0]}")
    if cams.size:
        if not np.isfinite(cams).all():
            raise CamFileError(f"{path}: maps contain NaN or Inf")
        if cams.min() < -RANGE_TOLERANCE or cams.max() > 1 + RANGE_TOLERANCE:
            raise CamFileError(f"{path}: maps must be normalised to [0, 1], found "
                               f"[{cams.min():.3g}, {cams.max():.3g}]")
    return keys.astype(np.int64), cams, hashlib.sha256(data).hexdigest()


def check_cam_dir(cam_dir: Path, ids: list[str], split: str) -> None:
    """Fail before any work unless ``cam_dir`` holds a CAM file for every id of ``split``."""
    cam_dir = Path(cam_dir)
    if not cam_dir.is_dir():
        raise CamFileError(f"{cam_dir}: CAM folder not found")
    missing = [i for i in ids if not (cam_dir / f"{i}.npz").is_file()]
    if missing:
        # A run limited by dataset.max_images inferred a prefix of the split: say how to score it.
        present = len(ids) - len(missing)
        hint = (f"; the first {present} are there (--max-images {present} scores them)"
                if present and missing == ids[present:] else "")
        raise CamFileError(f"{cam_dir}: no CAM file for {len(missing)} of {len(ids)} images "
                           f"of split {split!r} (first: {missing[0]}.npz){hint}")


#: Per-folder record of the CAM files' checksums, written once a split's CAMs are complete.
CHECKSUMS = ".sha256.json"


def record_checksums(cam_dir: Path, known: Optional[dict[str, str]] = None) -> None:
    """Write ``cam_dir/.sha256.json``: each CAM file's SHA-256, for :func:`damaged_cam_files`.

    ``known`` maps file names to digests already taken (by scoring's read); only the other
    files are hashed here.
    """
    cam_dir = Path(cam_dir)
    known = known or {}
    sums = {path.name: known.get(path.name) or io.file_sha256(path) for path in sorted(cam_dir.glob("*.npz"))}
    io.write_json(cam_dir / CHECKSUMS, sums)


def damaged_cam_files(cam_dir: Path, num_classes: Optional[int] = None) -> list[Path]:
    """CAM files of ``cam_dir`` that cannot be trusted: changed since :func:`record_checksums`
    recorded them, or (not recorded) unreadable or invalid as :func:`read_cam` checks them.

    Reading is the check for files written after the last record (a killed run): it catches
    truncated files (the zip directory or its CRC) and files of another format.
    """
    cam_dir = Path(cam_dir)
    try:
        recorded = json.loads((cam_dir / CHECKSUMS).read_text())
    except (OSError, ValueError):
        recorded = {}
    if not isinstance(recorded, dict):
        recorded = {}
    damaged = []
    for path in sorted(cam_dir.glob("*.npz")):
        expected = recorded.get(path.name)
        if expected is not None:
            if io.file_sha256(path) != expected:
                damaged.append(path)
            continue
        try:
            read_cam(path, num_classes)
        except CamFileError:
            damaged.append(path)
    return damaged
