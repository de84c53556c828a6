"""Confusion matrices with torchmetrics, and IoU / precision / recall from them.

Conventions (SC-CAM, IRN): C+1 classes (background = 0), label 255 ignored, IoU_c =
TP / (GT_c + Pred_c - TP), mIoU = mean over the classes present in the ground truth.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torchmetrics.classification import MulticlassConfusionMatrix

IGNORE_INDEX = 255


class ConfusionAccumulator:
    """Accumulates a ``[C+1, C+1]`` confusion matrix (rows = ground truth) on a device."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes + 1
        self.device = torch.device(device)
        # validate_args=False: inputs are produced and checked by us, and validation is a full
        # pass over every pixel.
        self.metric = MulticlassConfusionMatrix(
            num_classes=self.num_classes, ignore_index=IGNORE_INDEX, validate_args=False
        ).to(self.device)

    def update(self, prediction: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        """Add one prediction / ground-truth pair (integer maps of equal shape)."""
        pred = torch.as_tensor(np.asarray(prediction) if isinstance(prediction, np.ndarray) else prediction)
        gt = torch.as_tensor(np.asarray(target) if isinstance(target, np.ndarray) else target)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(gt.shape)} differ")
        self.metric.update(pred.to(self.device, torch.long).reshape(-1),
                           gt.to(self.device, torch.long).reshape(-1))

    def compute(self) -> np.ndarray:
        """The confusion matrix as int64 numpy."""
        return self.metric.compute().cpu().numpy().astype(np.int64)


def scores_from_confusion(confusion: np.ndarray) -> dict[str, np.ndarray | float]:
    """Per-class IoU, precision and recall, and the mIoU over classes present in the GT."""
    confusion = confusion.astype(np.float64)
    tp = np.diag(confusion)
    gt = confusion.sum(axis=1)
    pred = confusion.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = tp / (gt + pred - tp)
        precision = tp / pred
        recall = tp / gt
    present = gt > 0
    iou = np.where(present, iou, np.nan)
    recall = np.where(present, recall, np.nan)
    miou = float(np.nanmean(iou)) if present.any() else float("nan")
    return {"iou": iou, "precision": precision, "recall": recall, "miou": miou,
            "present": present}


def cams_to_labels(keys: np.ndarray | torch.Tensor, cams: torch.Tensor, threshold: float) -> torch.Tensor:
    """Label map from normalised CAMs with a constant background score (argmax).

    ``keys`` are 0-based foreground ids; returns a long tensor with 0 = background and
    ``keys[i] + 1`` where map i wins.  Ties go to the background, as in ``np.argmax`` over
    ``[bg, cams...]``.
    """
    keys_t = torch.as_tensor(np.asarray(keys) if not isinstance(keys, torch.Tensor) else keys,
                             dtype=torch.long, device=cams.device)
    if cams.shape[0] == 0:
        return torch.zeros(cams.shape[1:], dtype=torch.long, device=cams.device)
    best, index = cams.max(dim=0)
    labels = keys_t[index] + 1
    return torch.where(best > threshold, labels, torch.zeros_like(labels))


def class_table(class_names: Sequence[str], scores: dict, background: str = "background") -> list[dict]:
    """Rows ``{class, iou, precision, recall}`` for every class including background."""
    names = [background, *class_names]
    return [
        {"class": name, "iou": _f(scores["iou"][i]), "precision": _f(scores["precision"][i]),
         "recall": _f(scores["recall"][i])}
        for i, name in enumerate(names)
    ]


def _f(value: float) -> Optional[float]:
    return None if value != value else float(value)
