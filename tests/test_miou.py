"""mIoU parity with an independent numpy confusion-matrix implementation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from wsss_bench.evaluation.miou import ConfusionAccumulator, cams_to_labels, scores_from_confusion


def numpy_reference(preds: list[np.ndarray], gts: list[np.ndarray], n: int) -> tuple[np.ndarray, float, np.ndarray]:
    """SC-CAM-style scoring written independently: bincount confusion, nanmean over GT classes."""
    conf = np.zeros((n, n), np.int64)
    for p, g in zip(preds, gts):
        keep = g != 255
        conf += np.bincount(n * g[keep].astype(np.int64) + p[keep], minlength=n * n).reshape(n, n)
    iou = np.full(n, np.nan)
    for c in range(n):
        tp, row, col = conf[c, c], conf[c].sum(), conf[:, c].sum()
        if row > 0:
            iou[c] = tp / (row + col - tp)
    return conf, float(np.nanmean(iou)), iou


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_confusion_and_miou_match_numpy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 6
    preds, gts = [], []
    for _ in range(5):
        h, w = rng.integers(5, 30, size=2)
        gt = rng.integers(0, n - 1, (h, w))  # class n-1 never appears in the ground truth
        gt[rng.random((h, w)) < 0.2] = 255  # ignore pixels
        pred = rng.integers(0, n, (h, w))  # ...but is predicted: must not enter the mean
        preds.append(pred)
        gts.append(gt)
    acc = ConfusionAccumulator(n - 1, "cpu")
    for p, g in zip(preds, gts):
        acc.update(p, g)
    conf = acc.compute()
    ref_conf, ref_miou, ref_iou = numpy_reference(preds, gts, n)
    np.testing.assert_array_equal(conf, ref_conf)
    scores = scores_from_confusion(conf)
    assert scores["miou"] == pytest.approx(ref_miou, abs=1e-12)
    np.testing.assert_allclose(scores["iou"], ref_iou, equal_nan=True)
    assert np.isnan(scores["iou"][n - 1])


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.int64])
def test_label_dtypes_count_the_same(dtype) -> None:
    # Masks arrive as uint8 (PNG) and predictions as int64 (torch argmax); the counting path
    # depends on the target dtype (256 rows for uint8, max+1 otherwise).
    rng = np.random.default_rng(7)
    n = 21
    gt = rng.integers(0, n, (37, 53))
    gt[rng.random(gt.shape) < 0.1] = 255
    pred = rng.integers(0, n, gt.shape)
    acc = ConfusionAccumulator(n - 1)
    acc.update(pred.astype(dtype), gt.astype(dtype))
    np.testing.assert_array_equal(acc.compute(), numpy_reference([pred], [gt], n)[0])


def test_ground_truth_outside_the_classes_is_an_error() -> None:
    gt = np.array([[0, 1], [7, 255]], np.uint8)  # 7 is neither a class of 3+1 nor ignore
    acc = ConfusionAccumulator(3)
    with pytest.raises(ValueError, match=r"labels \[7\]"):
        acc.update(np.zeros_like(gt), gt)
    with pytest.raises(ValueError, match="integer"):
        acc.update(np.zeros((2, 2), np.float32), gt)


def test_perfect_prediction_scores_one() -> None:
    gt = np.array([[0, 1], [2, 255]])
    acc = ConfusionAccumulator(2)
    acc.update(np.array([[0, 1], [2, 0]]), gt)
    assert scores_from_confusion(acc.compute())["miou"] == 1.0


def test_cams_to_labels_uses_constant_background() -> None:
    cams = torch.tensor([[[0.1, 0.5], [0.9, 0.15]], [[0.05, 0.6], [0.2, 0.0]]])
    labels = cams_to_labels(np.array([3, 7]), cams, 0.15)
    # pixel (1,1): 0.15 is not above the background score, ties go to background
    assert labels.tolist() == [[0, 8], [4, 0]]


def test_no_classes_gives_background() -> None:
    labels = cams_to_labels(np.zeros(0, np.int64), torch.zeros(0, 3, 4), 0.15)
    assert labels.shape == (3, 4) and int(labels.max()) == 0
