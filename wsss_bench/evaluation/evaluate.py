"""Score a folder of CAM files against a split's ground-truth masks."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..data.voc import VOCDataset, open_split
from ..errors import DataError
from ..progress import progress_bar
from . import DEFAULT_THRESHOLD
from .camfiles import check_cam_dir, read_cam
from .miou import ConfusionAccumulator, cams_to_labels, class_table, scores_from_confusion


@dataclass
class EvalResult:
    """The scores of one split under one threshold."""

    split: str
    threshold: float
    miou: float
    per_class: list[dict[str, Any]]
    confusion: np.ndarray = field(repr=False)
    num_images: int = 0
    protocol: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the confusion matrix as nested lists)."""
        return {
            "split": self.split, "miou": self.miou, "num_images": self.num_images,
            "threshold": self.threshold, "protocol": self.protocol,
            "per_class": self.per_class, "confusion": self.confusion.tolist(),
        }


def result_row(result: EvalResult, tag: str, head: str, cam_dir: Path,
               extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """A machine-readable result row."""
    return {"tag": tag, "head": head, **(extra or {}), "split": result.split,
            "miou": result.miou, "num_images": result.num_images, "protocol": result.protocol,
            "per_class": result.per_class, "cams": str(cam_dir)}


def evaluate_cams(cam_dir: Path, dataset: VOCDataset, threshold: float = DEFAULT_THRESHOLD,
                  device: torch.device | str = "cpu", show_progress: bool = False,
                  stage: str = "cam") -> EvalResult:
    """Accumulate the confusion of every image of ``dataset`` whose CAM is in ``cam_dir``."""
    cam_dir = Path(cam_dir)
    check_cam_dir(cam_dir, dataset.ids, dataset.split)
    acc = ConfusionAccumulator(dataset.num_classes, device)
    for image_id in progress_bar(dataset.ids, f"eval {dataset.split}", show_progress):
        mask = dataset.load_mask(image_id, dataset.image_size(image_id))
        keys, cams = read_cam(cam_dir / f"{image_id}.npz", dataset.num_classes, mask.shape)
        pred = cams_to_labels(keys, torch.from_numpy(cams).to(acc.device), threshold)
        try:
            acc.update(pred, torch.from_numpy(mask))
        except ValueError as exc:
            raise DataError(f"ground-truth mask of {image_id!r} ({dataset.split}): {exc}") from None
    confusion = acc.compute()
    scores = scores_from_confusion(confusion)
    protocol = {"split": dataset.split, "stage": stage, "threshold_policy": "fixed",
                "threshold": threshold, "ignore_index": 255,
                "mean_over": "classes present in ground truth"}
    return EvalResult(dataset.split, threshold, scores["miou"],
                      class_table(dataset.class_names, scores), confusion, len(dataset.ids), protocol)


def evaluate_cam_dir(cam_dir: Path, data_root: Path, split: str = "train", threshold: float = DEFAULT_THRESHOLD,
                     device: str = "cpu", labels_file: Optional[Path] = None,
                     max_images: Optional[int] = None) -> EvalResult:
    """Public API: score ``cam_dir`` against ``split`` of the VOC-layout tree at ``data_root``.

    ``max_images`` scores the split's first N images only, the ones a run with
    ``dataset.max_images=N`` inferred.
    """
    from ..device import resolve_device

    dataset = open_split(Path(data_root), split, labels_file).subset(max_images)
    if dataset.mask_dir is None:
        raise DataError(f"{data_root}: no ground-truth masks to evaluate against")
    return evaluate_cams(cam_dir, dataset, threshold, resolve_device(device))
