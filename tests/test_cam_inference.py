"""Multi-scale CAM inference: against the original per-pass structure, in bf16, and sharded."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsss_bench.components import create_backbone
from wsss_bench.data.transforms import normalize, resize_by_scale
from wsss_bench.data.voc import open_split
from wsss_bench.device import autocast_dtype
from wsss_bench.engine.cams import image_cams, infer_split, shard_ids
from wsss_bench.engine.model import Classifier

SCALES = (1.0, 0.5, 1.5, 2.0)
CPU = torch.device("cpu")


def _model(classes: int = 3) -> Classifier:
    torch.manual_seed(0)
    backbone = create_backbone("resnet38d", width=0.0625, freeze_bn=False, freeze_stem=False)
    return Classifier(backbone, classes).eval()


def _original_structure(model: Classifier, image, keys: list[int]) -> np.ndarray:
    """SC-CAM's loop: one batch-1 pass per scale and flip, every class upsampled, numpy fusion."""
    w, h = image.size
    total = np.zeros((model.num_classes, h, w), np.float32)
    with torch.no_grad():
        for scale in SCALES:
            arr = normalize(resize_by_scale(image, scale))
            for flip in (False, True):
                src = arr[:, ::-1] if flip else arr
                x = torch.from_numpy(np.ascontiguousarray(src.transpose(2, 0, 1)))[None]
                cam = F.relu(F.conv2d(model.backbone(x), model.heads["parent"].weight))
                cam = F.interpolate(cam, (h, w), mode="bilinear", align_corners=False)[0].numpy()
                total += cam[:, :, ::-1] if flip else cam
    norm = total / (total.max(axis=(1, 2), keepdims=True) + 1e-5)
    return norm[keys]


def test_image_cams_equal_the_original_per_pass_structure(tiny_voc: Path) -> None:
    model = _model()
    ds = open_split(tiny_voc, "val")
    image = ds.load_image(ds.ids[0])
    keys = [0, 2]
    ours = image_cams(model, image, keys, SCALES, True, CPU)
    reference = _original_structure(model, image, keys)
    assert ours.shape == reference.shape == (2, image.size[1], image.size[0])
    np.testing.assert_allclose(ours, reference, atol=1e-5)


@pytest.mark.skipif(autocast_dtype(CPU, "auto") is None, reason="no native bf16 on this CPU")
def test_bf16_maps_stay_close_to_fp32(tiny_voc: Path) -> None:
    model = _model()
    ds = open_split(tiny_voc, "val")
    image = ds.load_image(ds.ids[1])
    fp32 = image_cams(model, image, [0, 1, 2], SCALES, True, CPU)
    bf16 = image_cams(model, image, [0, 1, 2], SCALES, True, CPU, precision="bf16")
    assert bf16.dtype == np.float32
    assert not np.array_equal(bf16, fp32)  # the low-precision path was really taken
    assert np.abs(bf16 - fp32).max() < 0.05
    # The pseudo labels (argmax over [bg=0.15, maps]) agree on almost every pixel.
    def labels(m: np.ndarray) -> np.ndarray:
        return np.argmax(np.concatenate([np.full((1, *m.shape[1:]), 0.15, np.float32), m]), axis=0)
    assert (labels(bf16) == labels(fp32)).mean() > 0.98


def test_shards_partition_the_ids() -> None:
    ids = [f"i{k}" for k in range(7)]
    shards = [shard_ids(ids, r, 3) for r in range(3)]
    assert sorted(sum(shards, [])) == sorted(ids)
    assert [len(s) for s in shards] == [3, 2, 2]
    with pytest.raises(ValueError):
        shard_ids(ids, 3, 3)


def test_sharded_inference_writes_exactly_the_single_process_files(tiny_voc: Path, tmp_path: Path) -> None:
    model = _model()
    ds = open_split(tiny_voc, "train_aug")
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    assert infer_split(model, ds, single, (1.0, 0.5), True, CPU) == len(ds.ids)
    written = [infer_split(model, ds, sharded, (1.0, 0.5), True, CPU, rank=r, world_size=2)
               for r in range(2)]
    assert written == [4, 4]
    assert sorted(p.name for p in sharded.iterdir()) == sorted(p.name for p in single.iterdir())
    for path in single.iterdir():
        with np.load(path) as a, np.load(sharded / path.name) as b:
            assert np.array_equal(a["keys"], b["keys"])
            assert np.array_equal(a["cams"], b["cams"])
    # A second pass finds everything written and does nothing.
    assert infer_split(model, ds, sharded, (1.0, 0.5), True, CPU) == 0
