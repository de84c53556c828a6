"""Score a folder of label-map PNGs (pseudo masks, refinements, segmentations) like CAMs.

Any single-channel ``<id>.png`` holding 0 (background), ``1..C`` and 255 (unsure) is read: our
VOC-palette masks (``wsss export-masks``, ``wsss refine``), PSA's random-walk output
(``--out_rw``, grey levels) and IRN's ``sem_seg`` PNGs alike.

Repositories disagree on the unsure pixels: ignoring them drops them from the score (and
inflates it: a mask that labels only its easiest pixels scores high), counting them as
background penalises them.  ``ignore_policy`` says which (default ``background``), every row
states it, and ``coverage`` (the share of labelled ground-truth pixels that received a confident
label) stands beside the mIoU.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..data.voc import IGNORE_INDEX, VOCDataset, read_mask
from ..errors import ConfigError, DataError
from ..progress import progress_bar
from .evaluate import EvalResult
from .miou import ConfusionAccumulator, class_table, scores_from_confusion

IGNORE_POLICIES = ("background", "ignore")


def check_mask_dir(mask_dir: Path, dataset: VOCDataset) -> None:
    """Fail before any work unless ``mask_dir`` holds ``<id>.png`` for every image of the split."""
    mask_dir = Path(mask_dir)
    if not mask_dir.is_dir():
        raise DataError(f"{mask_dir}: mask folder not found")
    missing = [i for i in dataset.ids if not (mask_dir / f"{i}.png").is_file()]
    if missing:
        raise DataError(f"{mask_dir}: no mask for {len(missing)} of {len(dataset.ids)} images of split "
                        f"{dataset.split!r} (first: {missing[0]}.png)")


def evaluate_masks(mask_dir: Path, dataset: VOCDataset, ignore_policy: str = "background",
                   device: torch.device | str = "cpu", stage: str = "mask",
                   show_progress: bool = False, per_image: bool = False,
                   cam_method: Optional[str] = None) -> EvalResult:
    """Score every image's ``mask_dir/<id>.png`` against ``dataset``'s ground truth.

    ``ignore_policy``: ``background`` counts unsure (255) pixels as background; ``ignore``
    leaves them out of the score.  The protocol carries the policy and the coverage; ``stage``
    names the pipeline stage (``refined:<refiner>``, ``seg``; ``mask`` for a folder of unknown
    origin) and ``cam_method`` the CAMs the masks came from, where known.  ``per_image`` keeps
    each image's confusion (``EvalResult.per_image``) for the bench's paired bootstrap.
    """
    if ignore_policy not in IGNORE_POLICIES:
        raise ConfigError(f"unknown ignore policy {ignore_policy!r}; choose one of {', '.join(IGNORE_POLICIES)}")
    mask_dir = Path(mask_dir)
    check_mask_dir(mask_dir, dataset)
    acc = ConfusionAccumulator(dataset.num_classes, device, keep_per_update=per_image)
    labelled = confident = 0
    for image_id in progress_bar(dataset.ids, f"eval masks {dataset.split}", show_progress):
        truth = dataset.load_mask(image_id, dataset.image_size(image_id))
        path = mask_dir / f"{image_id}.png"
        pred = read_mask(path, dataset.num_classes)
        if pred.shape != truth.shape:
            raise DataError(f"{path}: mask is {pred.shape[1]}x{pred.shape[0]} but the image is "
                            f"{truth.shape[1]}x{truth.shape[0]}")
        unsure = pred == IGNORE_INDEX
        valid = truth != IGNORE_INDEX
        labelled += int(valid.sum())
        confident += int((valid & ~unsure).sum())
        if ignore_policy == "ignore":
            truth = np.where(unsure, IGNORE_INDEX, truth).astype(np.uint8)
        acc.update(np.where(unsure, 0, pred).astype(np.uint8), truth)
    confusion = acc.compute()
    scores = scores_from_confusion(confusion)
    coverage = confident / labelled if labelled else float("nan")
    protocol = {"split": dataset.split, "stage": stage, "cam_method": cam_method,
                "threshold_policy": None, "threshold": None,
                "ignore_policy": ignore_policy, "coverage": coverage, "ignore_index": IGNORE_INDEX,
                "mean_over": "classes present in ground truth", "masks": str(mask_dir)}
    return EvalResult(dataset.split, float("nan"), scores["miou"], class_table(dataset.class_names, scores),
                      confusion, len(dataset.ids), protocol,
                      per_image=acc.per_update() if per_image else None,
                      ids=list(dataset.ids) if per_image else [])
