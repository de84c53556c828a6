"""Per-image scores of a CAM folder and the choice of example images."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np


def pseudo_mask(keys: np.ndarray, cams: np.ndarray, threshold: float) -> np.ndarray:
    """The label map of a CAM file at a constant background score (as ``wsss eval``)."""
    import torch

    from ...evaluation.miou import cams_to_labels

    labels = cams_to_labels(keys, torch.from_numpy(np.ascontiguousarray(cams, np.float32)), threshold)
    return labels.numpy().astype(np.uint8)


def image_miou(prediction: np.ndarray, truth: np.ndarray, num_classes: int) -> float:
    """mIoU of one image: mean IoU over the classes present in its ground truth (255 ignored).

    Counted by the package's one metric, with the split-level convention, so a ranked image's
    score reads the same way as the table; NaN when the image has no labelled pixel.
    """
    from ...evaluation.miou import ConfusionAccumulator, miou_from_confusions

    acc = ConfusionAccumulator(num_classes)
    acc.update(np.minimum(np.asarray(prediction, np.int64), num_classes), np.asarray(truth))
    return float(miou_from_confusions(acc.compute()))


@dataclass
class ImageScore:
    """What the examples grid needs of one image of one CAM folder."""

    image_id: str
    miou: float


def score_images(cam_dir: Path, dataset: Any, threshold: float) -> list[ImageScore]:
    """Per-image mIoU of every image of ``dataset`` that has a CAM file in ``cam_dir``."""
    import dataclasses

    from ...evaluation.miou import miou_from_confusions
    from ...evaluation.scoring import score_split

    # A run limited by max_images has CAMs for a prefix of the split only.
    present = [i for i in dataset.ids if (cam_dir / f"{i}.npz").is_file()]
    if not present:
        return []
    scored = score_split(cam_dir, dataclasses.replace(dataset, ids=present), [threshold],
                         per_image_threshold=threshold, label="rank")
    assert scored.per_image is not None
    return [ImageScore(i, float(m)) for i, m in zip(present, miou_from_confusions(scored.per_image))]


def pick_examples(scores: Sequence[ImageScore], count: int, seed: int
                  ) -> list[tuple[str, ImageScore]]:
    """The ``count`` best, ``count`` worst and ``count`` random images, without repeats."""
    ranked = sorted((s for s in scores if s.miou == s.miou), key=lambda s: (-s.miou, s.image_id))
    best = ranked[:count]
    rest = ranked[len(best):]
    worst = list(reversed(rest[-count:])) if count else []
    taken = {s.image_id for s in best + worst}
    pool = [s for s in ranked if s.image_id not in taken]
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(pool), size=min(count, len(pool)), replace=False).tolist()) if pool else []
    return ([("best", s) for s in best] + [("worst", s) for s in worst]
            + [("random", pool[i]) for i in chosen])
