"""Pseudo-label masks from CAM files: VOC-palette PNGs (``wsss export-masks``).

Each pixel gets the argmax foreground class when its best score is above a constant background
threshold (the rule of :func:`~wsss_bench.evaluation.miou.cams_to_labels`), or, with a
confidence band ``(LOW, HIGH]``, background at or below LOW, the class above HIGH and 255
("uncertain", ignored by training losses and by our evaluator) in between — IRN/AMN's
``conf_bg_thres`` / ``conf_fg_thres``.

PNGs are mode ``P`` with the standard PASCAL VOC colour map, so the pixel values are the class
indices (read them with :func:`~wsss_bench.data.voc.read_mask`, never as luminance) while
viewers show VOC's familiar colours.
"""
from __future__ import annotations

import io as _io
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from .. import io
from ..data.voc import IGNORE_INDEX, VOCDataset, voc_palette
from ..errors import ConfigError
from ..progress import progress_bar
from . import DEFAULT_THRESHOLD
from .camfiles import check_cam_dir, read_cam
from .miou import cams_to_labels


_PALETTE = voc_palette().reshape(-1).tolist()


def palette_png_bytes(labels: np.ndarray) -> bytes:
    """Encode a uint8 ``[H, W]`` label map as a VOC-palette (mode ``P``) PNG."""
    labels = np.ascontiguousarray(labels, dtype=np.uint8)
    height, width = labels.shape
    # frombytes keeps the values as palette indices; converting an 'L' image to 'P' would
    # quantise the grey levels instead.
    img = Image.frombytes("P", (width, height), labels.tobytes())
    img.putpalette(_PALETTE)
    buffer = _io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def _image_size(dataset: VOCDataset, image_id: str) -> tuple[int, int]:
    """(H, W) of the image, reading only its header: CAMs must be at image resolution."""
    width, height = dataset.image_size(image_id)
    return height, width


def _check_band(band: Optional[tuple[float, float]]) -> Optional[tuple[float, float]]:
    if band is None:
        return None
    low, high = float(band[0]), float(band[1])
    if not (0.0 <= low < high <= 1.0):
        raise ConfigError(f"confidence band must satisfy 0 <= LOW < HIGH <= 1, got {low} {high}")
    return low, high


def masks_from_cams(keys: np.ndarray, cams: torch.Tensor, threshold: float = DEFAULT_THRESHOLD,
                    band: Optional[tuple[float, float]] = None) -> torch.Tensor:
    """Pseudo-label map (long ``[H, W]``) from one image's CAMs.

    Without ``band`` this is exactly :func:`cams_to_labels`.  With ``band = (low, high)``:
    best score <= low → 0, in ``(low, high]`` → 255, > high → the argmax class.
    """
    if band is None:
        return cams_to_labels(keys, cams, threshold)
    low, high = band
    confident = cams_to_labels(keys, cams, high)
    if cams.shape[0] == 0:
        return confident  # no foreground map: background everywhere
    best = cams.max(dim=0).values
    uncertain = (best > low) & (best <= high)
    return torch.where(uncertain, torch.full_like(confident, IGNORE_INDEX), confident)


def export_masks(cam_dir: Path, dataset: VOCDataset, out_dir: Path,
                 threshold: float = DEFAULT_THRESHOLD, band: Optional[tuple[float, float]] = None,
                 device: torch.device | str = "cpu", show_progress: bool = False) -> int:
    """Write ``out_dir/<id>.png`` for every image of ``dataset``; returns the number written.

    Every id must have a CAM file: missing files are reported before anything is written.  Each
    PNG is written atomically, so a CAM file that fails validation part-way stops the export
    with a :class:`CamFileError`, leaving the PNGs already written complete and no partial file.
    """
    cam_dir, out_dir = Path(cam_dir), Path(out_dir)
    band = _check_band(band)
    if not (0.0 <= float(threshold) <= 1.0):
        raise ConfigError(f"threshold must lie in [0, 1], got {threshold}")
    check_cam_dir(cam_dir, dataset.ids, dataset.split)  # before anything is written
    if dataset.num_classes >= IGNORE_INDEX:
        raise ConfigError(f"{dataset.num_classes} classes do not fit a palette PNG with 255 = ignore")
    dev = torch.device(device)
    written = 0
    for image_id in progress_bar(dataset.ids, f"export {dataset.split}", show_progress):
        keys, cams = read_cam(cam_dir / f"{image_id}.npz", dataset.num_classes,
                              _image_size(dataset, image_id))
        labels = masks_from_cams(keys, torch.from_numpy(cams).to(dev), threshold, band)
        io.write_bytes(out_dir / f"{image_id}.png",
                       palette_png_bytes(labels.to(torch.uint8).cpu().numpy()))
        written += 1
    return written
