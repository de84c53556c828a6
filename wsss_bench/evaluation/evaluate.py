"""Score a folder of CAM files against a split's ground-truth masks."""
from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .. import io
from ..data.voc import IGNORE_INDEX, VOCDataset, open_split
from ..errors import DataError
from . import DEFAULT_THRESHOLD
from .miou import class_table, scores_from_confusion
from .rows import CAM
from .scoring import SplitScores, score_split


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
    #: ``[N, C+1, C+1]`` int64 confusion of each image (``evaluate_cams(per_image=True)``);
    #: sums exactly to ``confusion``.  Not in :meth:`to_dict`: it goes to its own file.
    per_image: Optional[np.ndarray] = field(default=None, repr=False)
    #: The image ids of ``per_image``'s rows, in order.
    ids: list[str] = field(default_factory=list, repr=False)

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
            "stage": result.protocol.get("stage", "cam"),
            "miou": result.miou, "num_images": result.num_images, "protocol": result.protocol,
            "per_class": result.per_class, "cams": str(cam_dir)}


def evaluate_cams(cam_dir: Path, dataset: VOCDataset, threshold: float = DEFAULT_THRESHOLD,
                  device: torch.device | str = "cpu", show_progress: bool = False,
                  stage: str = "cam", per_image: bool = False) -> EvalResult:
    """Score every image of ``dataset`` whose CAM is in ``cam_dir`` at one background threshold.

    ``per_image`` also keeps each image's confusion (``EvalResult.per_image``), for paired
    bootstraps over images (:func:`save_confusions`).
    """
    scores = score_split(cam_dir, dataset, [threshold], per_image_threshold=threshold if per_image else None,
                         device=device, show_progress=show_progress, label="eval")
    return result_at(scores, threshold, stage)


def result_at(scores: SplitScores, threshold: float, stage: str = "cam") -> EvalResult:
    """The :class:`EvalResult` of a scored split at ``threshold`` (the fixed policy)."""
    dataset = scores.dataset
    confusion = scores.confusion(threshold)
    table = scores_from_confusion(confusion)
    protocol = {"split": dataset.split, "stage": CAM, "cam_method": stage, "threshold_policy": "fixed",
                "threshold": threshold, "ignore_index": IGNORE_INDEX,
                "mean_over": "classes present in ground truth"}
    kept = scores.per_image if scores.per_image_threshold == float(threshold) else None
    return EvalResult(dataset.split, threshold, table["miou"], class_table(dataset.class_names, table),
                      confusion, len(dataset.ids), protocol, per_image=kept,
                      ids=scores.ids if kept is not None else [])


def save_confusions(run_dir: Path, relative: str, result: EvalResult) -> str:
    """Write ``result``'s per-image confusions to ``run_dir/relative`` (atomic, compressed).

    The ``.npz`` holds ``confusions`` (``[N, C+1, C+1]`` int64), ``ids`` (unicode, N), ``split``
    and ``threshold``; no object arrays, so it loads with ``allow_pickle=False``.  Returns
    ``relative``, the path a result row records (key ``confusions``).
    """
    if result.per_image is None or len(result.ids) != len(result.per_image):
        raise ValueError("save_confusions needs evaluate_cams(..., per_image=True)")
    arrays = {"confusions": result.per_image.astype(np.int64),
              "ids": np.array(result.ids, dtype=np.str_), "split": np.array(result.split, dtype=np.str_),
              "threshold": np.array(result.threshold, dtype=np.float64)}
    io.write_with(Path(run_dir) / relative, lambda handle: np.savez_compressed(handle, **arrays))
    return relative


def load_confusions(path: Path) -> tuple[np.ndarray, list[str]]:
    """The per-image confusions ``[N, K, K]`` int64 and image ids of a :func:`save_confusions` file."""
    path = Path(path)
    try:
        data = io.read_npz(path)
        confusions, ids = data["confusions"], [str(i) for i in data["ids"]]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a per-image confusion file ({exc})") from None
    if confusions.ndim != 3 or confusions.shape[1] != confusions.shape[2] or len(ids) != len(confusions):
        raise DataError(f"{path}: confusions of shape {confusions.shape} for {len(ids)} ids; "
                        "expected [N, K, K] with N ids")
    return confusions.astype(np.int64, copy=False), ids


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
