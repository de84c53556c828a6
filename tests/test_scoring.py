"""One scoring path: every CAM file is read once per round, and the one metric agrees with an
independent per-threshold numpy count."""
from __future__ import annotations

import builtins
import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from wsss_bench.evaluation.miou import CamConfusion
from wsss_bench.testing import run_method_on_tiny_data


def test_each_cam_file_is_read_once_per_round(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Count opens at the file-system boundary (builtins.open and io.open, which pathlib uses),
    # not in our own reader: a second reading path anywhere in the run would be counted too.
    opened: Counter[str] = Counter()
    real_open = builtins.open

    def counting_open(file, mode="r", *args, **kwargs):  # type: ignore[no-untyped-def]
        name = str(file) if isinstance(file, (str, Path)) else ""
        if name.endswith(".npz") and "r" in mode and "/cams/" in name:
            opened[name] += 1
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(io, "open", counting_open)
    results = run_method_on_tiny_data("subcat", tmp_path, k=2)
    run = Path(results["run_dir"])
    files = sorted(str(p) for p in (run / "cams").rglob("*.npz"))
    rounds = {Path(f).parent.parent.name for f in files}
    assert len(rounds) >= 2, rounds                      # round 0 and at least one SC-CAM round
    assert {Path(f).parent.name for f in files} == {"train", "val"}
    # Every policy was scored, the held-out one from the other split's sweep.
    assert all(set(r["policies"]) == {"fixed", "oracle", "heldout"} for r in results["rows"])
    assert {f: opened[f] for f in files} == {f: 1 for f in files}


def numpy_confusion_at(cams: list[np.ndarray], keys: list[np.ndarray], gts: list[np.ndarray],
                       threshold: float, k: int) -> np.ndarray:
    """The original structure: a label map per threshold (argmax over [bg, cams...]), bincount."""
    conf = np.zeros((k, k), np.int64)
    for cam, key, gt in zip(cams, keys, gts):
        full = np.concatenate([np.full((1, *gt.shape), threshold, np.float32), cam])
        labels = np.concatenate([[0], key + 1])[np.argmax(full, axis=0)]
        keep = gt != 255
        conf += np.bincount(k * gt[keep].astype(np.int64) + labels[keep], minlength=k * k).reshape(k, k)
    return conf


@pytest.mark.parametrize("seed", [0, 1])
def test_sweep_metric_matches_numpy_per_threshold(seed: int) -> None:
    rng = np.random.default_rng(seed)
    classes, k = 5, 6
    thresholds = [0.5, 0.0, 0.15, 0.9, 0.15, 1.0]           # unsorted, duplicated, both ends
    cams, keys, gts = [], [], []
    for _ in range(4):
        h, w = rng.integers(4, 20, size=2)
        key = np.sort(rng.choice(classes, rng.integers(0, 3), replace=False))
        cam = rng.random((len(key), h, w)).astype(np.float32)
        cam[:, 0, 0] = 0.15                                # exactly on a threshold: background wins
        gt = rng.integers(0, k, (h, w)).astype(np.uint8)
        gt[rng.random((h, w)) < 0.2] = 255
        cams.append(cam), keys.append(key), gts.append(gt)
    metric = CamConfusion(classes, thresholds, per_image_threshold=0.15)
    for cam, key, gt in zip(cams, keys, gts):
        metric.update(torch.from_numpy(cam), torch.from_numpy(gt), key)
    got = metric.compute().numpy()
    for t, conf in zip(thresholds, got):
        np.testing.assert_array_equal(conf, numpy_confusion_at(cams, keys, gts, t, k))
    per_image = metric.per_image_confusions().numpy()
    assert per_image.shape == (4, k, k)
    np.testing.assert_array_equal(per_image.sum(0), got[2])


def test_label_maps_and_bad_inputs() -> None:
    metric = CamConfusion(2, (0.3,))
    gt = torch.tensor([[0, 1], [2, 255]], dtype=torch.uint8)
    metric.update(torch.tensor([[0, 1], [1, 2]]), gt)      # a label map: no keys
    np.testing.assert_array_equal(metric.compute()[0].numpy(), [[1, 0, 0], [0, 1, 0], [0, 1, 0]])
    with pytest.raises(ValueError, match=r"labels \[7\]"):
        metric.update(torch.zeros(2, 2, dtype=torch.long), torch.tensor([[0, 7], [1, 1]]))
    with pytest.raises(ValueError, match="class ids"):
        metric.update(torch.rand(1, 2, 2), gt, np.array([2]))  # id 2 of 2 foreground classes
    with pytest.raises(ValueError, match="differ"):
        metric.update(torch.rand(1, 3, 2), gt, np.array([0]))
    with pytest.raises(ValueError, match="threshold"):
        CamConfusion(2, ())
