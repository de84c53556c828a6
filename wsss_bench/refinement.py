"""Refinement: a refiner plugin turns a split's CAM files into pseudo-mask PNGs.

The host side of the ``refiner`` plugin kind: it builds the refiner from its validated options,
feeds it each image with its CAMs, checks every returned map against the contract
(:func:`wsss_bench.contracts.check_refiner_output`) and writes it as a VOC-palette PNG,
atomically.  The refiner's own ``protocol`` (options, weights and their checksum, CRF used or
absent) goes into the summary, so a refined row can state how it was made.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import contracts, io
from .data.voc import VOCDataset
from .evaluation.camfiles import check_cam_dir, read_cam
from .evaluation.pseudo_masks import palette_png_bytes
from .plugins import registry
from .progress import progress_bar


@dataclass
class BuiltRefiner:
    """A refiner object with the component it was made from and its validated options."""

    name: str
    refiner: Any
    component: Any
    options: dict[str, Any]

    @property
    def needs_fit(self) -> bool:
        """Whether the refiner must be trained (``fit``) before it can refine: it has a
        ``fit`` and does not say otherwise (``needs_fit = False``, e.g. weights were given)."""
        return callable(getattr(self.refiner, "fit", None)) and bool(getattr(self.refiner, "needs_fit", True))

    def protocol(self) -> dict[str, Any]:
        """What a refined row states about the refiner (its ``protocol``, named)."""
        protocol = dict(getattr(self.refiner, "protocol", None) or {})
        protocol.setdefault("refiner", self.name)
        return protocol


def build_refiner(name: str, options: dict[str, Any], device: torch.device | str = "cpu") -> BuiltRefiner:
    """The refiner ``name`` from its options (validated by its plugin), moved to ``device``."""
    component = registry("refiner").get(name)
    validated = component.validate_options(options)
    refiner = registry("refiner").create(name, **validated)
    if callable(getattr(refiner, "to", None)):
        refiner.to(device)
    return BuiltRefiner(name, refiner, component, validated)


def refine_images(built: BuiltRefiner, cam_dir: Path, dataset: VOCDataset, out_dir: Path,
                  show_progress: bool = True, skip_existing: bool = False) -> int:
    """Write ``out_dir/<id>.png`` for every image of ``dataset`` from ``cam_dir/<id>.npz``;
    returns the number written.  ``skip_existing`` keeps masks already there (a resumed stage:
    each PNG is written atomically, so one that exists is complete)."""
    cam_dir, out_dir = Path(cam_dir), Path(out_dir)
    check_cam_dir(cam_dir, dataset.ids, dataset.split)
    written = 0
    for image_id in progress_bar(dataset.ids, f"refine {dataset.split}", show_progress):
        target = out_dir / f"{image_id}.png"
        if skip_existing and target.is_file():
            continue
        image = dataset.load_image(image_id)
        size = (image.size[1], image.size[0])
        keys, cams = read_cam(cam_dir / f"{image_id}.npz", dataset.num_classes, size)
        labels = contracts.check_refiner_output(built.refiner.refine(image, cams, keys), size, keys,
                                                dataset.num_classes, built.component)
        io.write_bytes(target, palette_png_bytes(labels))
        written += 1
    return written


def refine_folder(name: str, options: dict[str, Any], cam_dir: Path, dataset: VOCDataset, out_dir: Path,
                  device: torch.device | str = "cpu", show_progress: bool = True) -> dict[str, Any]:
    """Write ``out_dir/<id>.png`` for every image of ``dataset`` from ``cam_dir/<id>.npz``;
    returns ``{"refiner", "options", "protocol", "split", "images", "cams"}``."""
    check_cam_dir(Path(cam_dir), dataset.ids, dataset.split)   # before the refiner loads its weights
    built = build_refiner(name, options, device)
    refine_images(built, cam_dir, dataset, out_dir, show_progress)
    return {"refiner": name, "options": built.options, "protocol": built.protocol(),
            "split": dataset.split, "images": len(dataset.ids), "cams": str(cam_dir)}
