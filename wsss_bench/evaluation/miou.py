"""Confusion matrices with torchmetrics, and IoU / precision / recall from them.

Conventions (SC-CAM, IRN): C+1 classes (background = 0), label 255 ignored, IoU_c =
TP / (GT_c + Pred_c - TP), mIoU = mean over the classes present in the ground truth.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torchmetrics import Metric

from ..data.voc import IGNORE_INDEX
from . import DEFAULT_THRESHOLD


def best_and_label(keys: np.ndarray | torch.Tensor, cams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best foreground score and its label (``keys[argmax] + 1``) per pixel.

    Images without foreground maps get a best score of ``-inf``, so that they are background at
    every threshold, as :func:`cams_to_labels` makes them.
    """
    if cams.shape[0] == 0:
        shape = cams.shape[1:]
        return (torch.full(shape, -math.inf, dtype=cams.dtype, device=cams.device),
                torch.zeros(shape, dtype=torch.long, device=cams.device))
    best, index = cams.max(dim=0)
    keys_t = torch.as_tensor(keys, dtype=torch.long, device=cams.device)
    return best, keys_t[index] + 1


class CamConfusion(Metric):
    """Confusion matrices (rows = ground truth) of CAMs at every threshold of a sweep.

    The one scoring path of the package: the ``fixed`` policy is a sweep of one threshold, the
    ``oracle`` and ``heldout`` policies and the robustness curve read a sweep of the grid, and
    label maps (pseudo masks, segmentation outputs) enter :meth:`update` without ``keys``,
    as predictions above every threshold.

    Rather than building T label maps per image, each pixel goes into bin ``k`` = number of
    thresholds strictly below its best foreground score; the state is one integer histogram
    ``[T+1, C+1, C+1]`` of (bin, ground truth, argmax label), and the T confusions are its
    suffix sums (:meth:`compute`): O(pixels log T) per image, exact counts.  Ignored pixels get
    a row of their own that is sliced away, so no boolean-mask copy is made.

    torchmetrics' split holds: optional input checks (``validate_args``, shape and id checks
    only, no pass over the pixels), :meth:`update`, :meth:`compute` and ``dist_reduce_fx="sum"``
    for the histogram across processes.  With ``per_image_threshold`` each update also keeps
    that image's confusion at that threshold (:meth:`per_image_confusions`), for paired
    bootstraps over images; they sum exactly to the matrix at that threshold.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    histogram: torch.Tensor
    per_image: list[torch.Tensor]

    def __init__(self, num_classes: int, thresholds: Sequence[float] = (DEFAULT_THRESHOLD,),
                 ignore_index: Optional[int] = IGNORE_INDEX, per_image_threshold: Optional[float] = None,
                 validate_args: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.validate_args = validate_args
        values = [float(t) for t in thresholds]
        if not values:
            raise ValueError("CamConfusion needs at least one threshold")
        if any(not math.isfinite(t) for t in values):
            raise ValueError(f"thresholds must be finite, got {values}")
        self.num_labels = int(num_classes) + 1
        self.thresholds = tuple(values)
        self.ignore_index = ignore_index
        self._order = np.argsort(values, kind="stable")
        self._sorted = [values[i] for i in self._order]
        self._per_image_bin: Optional[int] = None
        if per_image_threshold is not None:
            if float(per_image_threshold) not in values:
                raise ValueError(f"per_image_threshold {per_image_threshold} is not one of the thresholds")
            self._per_image_bin = self._sorted.index(float(per_image_threshold))
        k = self.num_labels
        self.add_state("histogram", torch.zeros((len(values) + 1) * k * k, dtype=torch.long),
                       dist_reduce_fx="sum")
        self.add_state("per_image", [], dist_reduce_fx="cat")
        self._threshold_tensors: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    # -- updates ------------------------------------------------------------------------------
    def update(self, preds: torch.Tensor, target: torch.Tensor,
               keys: Optional[torch.Tensor | np.ndarray] = None) -> None:
        """Add one image.

        ``preds`` is either float CAMs ``[n, H, W]`` of the 0-based class ids ``keys`` ``[n]``,
        or (``keys=None``) an integer label map ``[H, W]`` in ``0..C`` (a pseudo mask, a
        segmentation), which counts with its labels at every threshold.  ``target`` is the
        integer ground truth ``[H, W]``: classes ``0..C`` or the ignore label.
        """
        if keys is None:
            self._update_labels(preds, target)
            return
        keys_t = torch.as_tensor(keys)
        if self.validate_args:
            self._validate_cams(preds, keys_t, target)
        best, label = best_and_label(keys_t, preds)
        thresholds = self._thresholds_for(preds.dtype, preds.device)
        # cams_to_labels compares `best > t` with t rounded to the maps' dtype (torch casts a
        # Python scalar to the tensor's dtype); the thresholds were rounded the same way.
        # side="left": bin = #{t_j < best}, so best > t_j  <=>  j < bin.
        bins = torch.searchsorted(thresholds, best.to(thresholds.dtype).contiguous(), side="left")
        self._add(bins, label, target)

    def _update_labels(self, labels: torch.Tensor, target: torch.Tensor) -> None:
        if labels.shape != target.shape:
            raise ValueError(f"prediction {tuple(labels.shape)} and target {tuple(target.shape)} differ")
        if labels.is_floating_point() or target.is_floating_point():
            raise ValueError("label maps must be integer arrays")
        if (self.validate_args and labels.numel()
                and not (0 <= int(labels.min()) and int(labels.max()) < self.num_labels)):
            raise ValueError(f"predicted labels outside 0..{self.num_labels - 1}")
        self._add(None, labels, target)   # every pixel in the top bin: above every threshold

    def _validate_cams(self, cams: torch.Tensor, keys: torch.Tensor, target: torch.Tensor) -> None:
        if cams.ndim != 3 or not cams.is_floating_point():
            raise ValueError(f"cams must be a float tensor [n, H, W], got {cams.dtype} {tuple(cams.shape)}")
        if keys.ndim != 1 or keys.is_floating_point() or keys.numel() != cams.shape[0]:
            raise ValueError(f"keys must be {cams.shape[0]} integer class ids, got {keys.dtype} {tuple(keys.shape)}")
        if keys.numel() and not (0 <= int(keys.min()) and int(keys.max()) < self.num_labels - 1):
            raise ValueError(f"class ids {keys.tolist()} outside 0..{self.num_labels - 2}")
        if tuple(target.shape) != tuple(cams.shape[1:]):
            raise ValueError(f"maps {tuple(cams.shape[1:])} and target {tuple(target.shape)} differ")
        if target.is_floating_point():
            raise ValueError("the ground truth must be an integer label map")

    def _thresholds_for(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (dtype, device)
        if key not in self._threshold_tensors:
            # Round to the maps' dtype, then search in one that holds both exactly (float16 and
            # bfloat16 are widened: searchsorted may not support them).
            work = torch.float64 if dtype == torch.float64 else torch.float32
            self._threshold_tensors[key] = torch.tensor(self._sorted, dtype=dtype).to(device, work)
        return self._threshold_tensors[key]

    def _add(self, bins: Optional[torch.Tensor], label: torch.Tensor, target: torch.Tensor) -> None:
        """Count one image; ``bins`` None puts every pixel in the top bin (a label map)."""
        k, num_bins = self.num_labels, len(self.thresholds) + 1
        rows = k + 1                                  # row k collects the ignored pixels
        gt = target.reshape(-1).to(torch.int32)
        if self.ignore_index is not None:
            ignored = gt == self.ignore_index
            outside = (gt >= k) & ~ignored
        else:
            ignored, outside = None, gt >= k
        if target.dtype != torch.uint8:               # unsigned masks (PNGs) cannot be negative
            outside |= gt < 0
        if bool(outside.any()):
            bad = torch.unique(gt[outside]).tolist()
            raise ValueError(f"ground truth holds labels {bad} outside 0..{k - 1} "
                             f"and the ignore label {self.ignore_index}")
        if ignored is not None:
            gt = torch.where(ignored, k, gt)
        # int32 indices halve the memory traffic of bincount's input; wide sweeps fall back.
        wide = num_bins * rows * k >= 2 ** 31
        index = gt.to(torch.int64) if wide else gt
        index = index * k
        index += label.reshape(-1).to(index.dtype)
        if bins is None:
            index += (num_bins - 1) * rows * k
        else:
            index += bins.reshape(-1).to(index.dtype) * (rows * k)
        counts = torch.bincount(index, minlength=num_bins * rows * k).view(num_bins, rows, k)[:, :k]
        self.histogram += counts.reshape(-1)
        if self._per_image_bin is not None:
            self.per_image.append(_confusions_from_histogram(counts)[self._per_image_bin])

    # -- results ------------------------------------------------------------------------------
    def compute(self) -> torch.Tensor:
        """``[T, C+1, C+1]`` long: the confusion at each threshold, in the order given."""
        k = self.num_labels
        sorted_confusions = _confusions_from_histogram(self.histogram.view(-1, k, k))
        out = torch.empty_like(sorted_confusions)
        out[torch.as_tensor(self._order, device=out.device)] = sorted_confusions
        return out

    def per_image_confusions(self) -> torch.Tensor:
        """``[N, C+1, C+1]`` long: each update's confusion at ``per_image_threshold``, in order."""
        if self._per_image_bin is None:
            raise RuntimeError("CamConfusion(per_image_threshold=...) keeps per-image confusions")
        k = self.num_labels
        if isinstance(self.per_image, torch.Tensor):    # concatenated by a distributed sync
            return self.per_image.view(-1, k, k)
        if not self.per_image:
            return torch.zeros((0, k, k), dtype=torch.long, device=self.histogram.device)
        return torch.stack(self.per_image)


def _confusions_from_histogram(histogram: torch.Tensor) -> torch.Tensor:
    """``[T, K, K]`` confusions from a ``[T+1, K, K]`` (bin, gt, label) histogram.

    ``above[j]`` counts pixels in bins >= j; at sorted threshold j the pixels of bins > j keep
    their label (``above[j + 1]``) and the rest are background.
    """
    above = histogram.flip(0).cumsum(0).flip(0)
    keep = above[1:]
    background = (above[0].unsqueeze(0) - keep).sum(dim=2)
    confusions = keep.clone()
    confusions[:, :, 0] += background
    return confusions


class ConfusionAccumulator:
    """Accumulates a ``[C+1, C+1]`` confusion matrix (rows = ground truth) of label maps.

    A thin front of :class:`CamConfusion` (label maps, one threshold),
    so label maps and CAMs are counted by the same code.
    """

    def __init__(self, num_classes: int, device: torch.device | str = "cpu",
                 keep_per_update: bool = False) -> None:
        self.num_classes = num_classes + 1
        self.device = torch.device(device)
        self._keep_per_update = keep_per_update
        # validate_args=False: the label range check is a pass over every pixel, and our own
        # predictions are in range by construction.  sync_on_compute=False: under torchrun one
        # process scores a whole split; torchmetrics would otherwise wait for the others.
        self.metric = CamConfusion(num_classes, thresholds=(0.0,),
                                   per_image_threshold=0.0 if keep_per_update else None,
                                   validate_args=False, sync_on_compute=False).to(self.device)

    def update(self, prediction: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        """Add one prediction / ground-truth pair (integer maps of equal shape, predictions in
        ``0..C``; ground truth in ``0..C`` or the ignore label 255)."""
        pred = torch.as_tensor(prediction)
        gt = torch.as_tensor(target)
        self.metric.update(pred.to(self.device), gt.to(self.device))

    def compute(self) -> np.ndarray:
        """The confusion matrix as int64 numpy."""
        return self.metric.compute()[0].cpu().numpy().astype(np.int64)

    def per_update(self) -> np.ndarray:
        """``[N, C+1, C+1]`` int64: the confusion of each of the N updates, in order.

        Only with ``keep_per_update=True``; ``per_update().sum(0)`` equals :meth:`compute`.
        """
        if not self._keep_per_update:
            raise RuntimeError("ConfusionAccumulator(keep_per_update=True) keeps per-update confusions")
        return self.metric.per_image_confusions().cpu().numpy().astype(np.int64)


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


def miou_from_confusions(confusions: np.ndarray) -> np.ndarray:
    """mIoU of each of a stack of confusion matrices ``[..., K, K]`` (rows = ground truth).

    The same convention as :func:`scores_from_confusion` (IoU over the classes present in the
    ground truth; NaN where no class is), vectorised over the leading axes for bootstraps.
    """
    confusions = np.asarray(confusions, dtype=np.float64)
    tp = np.diagonal(confusions, axis1=-2, axis2=-1)
    gt = confusions.sum(axis=-1)
    pred = confusions.sum(axis=-2)
    present = gt > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(present, tp / (gt + pred - tp), 0.0)
        count = present.sum(axis=-1)
        return np.where(count > 0, iou.sum(axis=-1) / count, np.nan)


def cams_to_labels(keys: np.ndarray | torch.Tensor, cams: torch.Tensor, threshold: float) -> torch.Tensor:
    """Label map from normalised CAMs with a constant background score (argmax).

    ``keys`` are 0-based foreground ids; returns a long tensor with 0 = background and
    ``keys[i] + 1`` where map i wins.  Ties go to the background, as in ``np.argmax`` over
    ``[bg, cams...]``.
    """
    best, labels = best_and_label(keys, cams)   # no maps: best is -inf, all background
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
