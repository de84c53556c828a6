"""One pass over a split's CAM files: the confusions every report of the split needs.

Each CAM file and mask is read once per scoring (:func:`score_split`); the fixed policy, the
oracle and held-out policies, the robustness curve, the per-image confusions of the bench's
bootstrap and the folder's checksum record all come from that one pass
(:class:`SplitScores`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..data.voc import VOCDataset
from ..errors import ConfigError, DataError
from ..progress import progress_bar
from .camfiles import check_cam_dir, read_cam_with_digest
from .miou import CamConfusion, scores_from_confusion


@dataclass
class SplitScores:
    """The confusions of one split's CAMs at a set of background thresholds."""

    dataset: VOCDataset
    thresholds: tuple[float, ...]
    #: ``[T, C+1, C+1]`` int64, one per threshold, in the order of :attr:`thresholds`.
    confusions: np.ndarray = field(repr=False)
    #: ``[N, C+1, C+1]`` int64 confusion of each image at :attr:`per_image_threshold`.
    per_image: Optional[np.ndarray] = field(default=None, repr=False)
    per_image_threshold: Optional[float] = None
    #: CAM file name -> SHA-256 of the bytes that were scored.
    digests: dict[str, str] = field(default_factory=dict, repr=False)
    _curves: dict[tuple[float, ...], list[tuple[float, float]]] = field(default_factory=dict, repr=False)

    @property
    def split(self) -> str:
        """The split's name."""
        return self.dataset.split

    @property
    def ids(self) -> list[str]:
        """The image ids, in the order of :attr:`per_image`."""
        return list(self.dataset.ids)

    def confusion(self, threshold: float) -> np.ndarray:
        """The confusion at ``threshold`` (one of :attr:`thresholds`)."""
        try:
            return self.confusions[self.thresholds.index(float(threshold))]
        except ValueError:
            raise KeyError(f"threshold {threshold} was not swept") from None

    def miou(self, threshold: float) -> float:
        """mIoU at ``threshold``."""
        return float(scores_from_confusion(self.confusion(threshold))["miou"])

    def curve(self, grid: Sequence[float]) -> list[tuple[float, float]]:
        """``(threshold, mIoU)`` over ``grid``, sorted by threshold (computed once per grid:
        every policy report of a split reads the same curve)."""
        key = tuple(float(t) for t in grid)
        if key not in self._curves:
            self._curves[key] = miou_curve(key, np.stack([self.confusion(t) for t in key]))
        return self._curves[key]


def miou_curve(thresholds: Sequence[float], confusions: np.ndarray) -> list[tuple[float, float]]:
    """``(threshold, mIoU)`` pairs, sorted by threshold, from confusions ``[T, K, K]`` at
    ``thresholds`` (e.g. :func:`~wsss_bench.evaluation.thresholds.sweep_confusions`' output)."""
    if len(thresholds) != len(confusions):
        raise ValueError(f"{len(thresholds)} thresholds but {len(confusions)} confusion matrices")
    pairs = [(float(t), float(scores_from_confusion(c)["miou"])) for t, c in zip(thresholds, confusions)]
    return sorted(pairs, key=lambda p: p[0])


def score_split(cam_dir: Path, dataset: VOCDataset, thresholds: Sequence[float], *,
                per_image_threshold: Optional[float] = None, device: torch.device | str = "cpu",
                show_progress: bool = False, label: str = "score") -> SplitScores:
    """Read every CAM file of ``dataset`` in ``cam_dir`` once and count its confusions at each
    of ``thresholds`` (any order, duplicates allowed).

    ``per_image_threshold`` (one of ``thresholds``) also keeps each image's confusion there.
    Fails before any work unless every image has a CAM file.
    """
    cam_dir = Path(cam_dir)
    values = tuple(float(t) for t in thresholds)
    if not values:
        raise ConfigError("no thresholds to score at")
    try:
        metric = CamConfusion(dataset.num_classes, values, per_image_threshold=per_image_threshold,
                              sync_on_compute=False).to(torch.device(device))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    check_cam_dir(cam_dir, dataset.ids, dataset.split)
    digests: dict[str, str] = {}
    for image_id in progress_bar(dataset.ids, f"{label} {dataset.split}", show_progress):
        mask = dataset.load_mask(image_id, dataset.image_size(image_id))
        keys, cams, digests[f"{image_id}.npz"] = read_cam_with_digest(
            cam_dir / f"{image_id}.npz", dataset.num_classes, mask.shape)
        try:
            metric.update(torch.from_numpy(cams).to(metric.device), torch.from_numpy(mask).to(metric.device), keys)
        except ValueError as exc:
            raise DataError(f"ground-truth mask of {image_id!r} ({dataset.split}): {exc}") from None
    confusions = metric.compute().cpu().numpy().astype(np.int64)
    per_image = (metric.per_image_confusions().cpu().numpy().astype(np.int64)
                 if per_image_threshold is not None else None)
    return SplitScores(dataset, values, confusions, per_image,
                       None if per_image_threshold is None else float(per_image_threshold), digests)
