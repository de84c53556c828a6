"""Refinement: a refiner plugin turns a split's CAM files into pseudo-mask PNGs.

The host side of the ``refiner`` plugin kind: it builds the refiner from its validated options,
feeds it each image with its CAMs, checks every returned map against the contract
(:func:`wsss_bench.contracts.check_refiner_output`) and writes it as a VOC-palette PNG,
atomically.  The refiner's own ``protocol`` (options, weights and their checksum, CRF used or
absent) goes into the summary, so a refined row can state how it was made.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from . import contracts, io
from .data.voc import VOCDataset
from .evaluation.camfiles import check_cam_dir, read_cam
from .evaluation.pseudo_masks import palette_png_bytes
from .plugins import registry
from .progress import progress_bar


def refine_folder(name: str, options: dict[str, Any], cam_dir: Path, dataset: VOCDataset, out_dir: Path,
                  device: torch.device | str = "cpu", show_progress: bool = True) -> dict[str, Any]:
    """Write ``out_dir/<id>.png`` for every image of ``dataset`` from ``cam_dir/<id>.npz``;
    returns ``{"refiner", "options", "protocol", "split", "images", "cams"}``."""
    cam_dir, out_dir = Path(cam_dir), Path(out_dir)
    check_cam_dir(cam_dir, dataset.ids, dataset.split)   # before the refiner loads its weights
    component = registry("refiner").get(name)
    validated = component.validate_options(options)
    refiner = registry("refiner").create(name, **validated)
    if callable(getattr(refiner, "to", None)):
        refiner.to(device)
    for image_id in progress_bar(dataset.ids, f"refine {dataset.split}", show_progress):
        image = dataset.load_image(image_id)
        size = (image.size[1], image.size[0])
        keys, cams = read_cam(cam_dir / f"{image_id}.npz", dataset.num_classes, size)
        labels = contracts.check_refiner_output(refiner.refine(image, cams, keys), size, keys,
                                                dataset.num_classes, component)
        io.write_bytes(out_dir / f"{image_id}.png", palette_png_bytes(labels))
    protocol = dict(getattr(refiner, "protocol", None) or {})
    protocol.setdefault("refiner", name)
    return {"refiner": name, "options": validated, "protocol": protocol,
            "split": dataset.split, "images": len(dataset.ids), "cams": str(cam_dir)}
