"""Refinement: PSA's pair layout, the sparse random walk against the dense one, AffinityNet in
PSA's key layout loading strictly, ``wsss refine`` against an independent restatement of PSA's
``infer_aff.py``, and ``wsss eval --masks`` with both ignore policies."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

from tests.conftest import write_voc_tree
from wsss_bench import hookimpl, plugins
from wsss_bench.cli.main import cli
from wsss_bench.data.transforms import normalize
from wsss_bench.engine.affinity_net import AffinityNet
from wsss_bench.engine.random_walk import (dense_random_walk, pair_affinity, pair_indices, pair_offsets,
                                           random_walk)
from wsss_bench.errors import PluginError
from wsss_bench.evaluation.camfiles import write_cam


def psa_pairs_by_loops(radius: int, h: int, w: int) -> tuple[list[int], list[int]]:
    """PSA's get_indices_of_pairs restated with loops: offsets in its order, crop r-1."""
    offsets = [(0, dx) for dx in range(1, radius)]
    offsets += [(dy, dx) for dy in range(1, radius) for dx in range(-radius + 1, radius)
                if dx * dx + dy * dy < radius * radius]
    c = radius - 1
    src, dst = [], []
    for dy, dx in offsets:
        for y in range(0, h - c):
            for x in range(c, w - c):
                src.append(y * w + x)
                dst.append((y + dy) * w + (x + dx))
    return src, dst


def test_pairs_follow_psa_layout() -> None:
    assert len(pair_offsets(5)) == 34 and pair_offsets(5)[:4] == [(0, 1), (0, 2), (0, 3), (0, 4)]
    pairs = pair_indices(5, (11, 14))
    src, dst = psa_pairs_by_loops(5, 11, 14)
    assert pairs.source.tolist() == src and pairs.target.tolist() == dst
    assert pair_indices(5, (4, 20)).source.numel() == 0   # too small for a pair: no crash


def smooth_features(h: int, w: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    region = ((yy // 9) * 5 + (xx // 11)).float()
    return torch.stack([torch.sin(region * (k + 1)) for k in range(12)]) + 0.05 * torch.randn(12, h, w, generator=gen)


@pytest.mark.parametrize("seed", [0, 1])
def test_sparse_walk_equals_dense_float64(seed: int) -> None:
    h, w = 23, 31
    pairs = pair_indices(5, (h, w))
    affinity = pair_affinity(smooth_features(h, w, seed), pairs)
    cams = torch.rand(4, h, w, generator=torch.Generator().manual_seed(seed))
    ours = random_walk(cams, affinity, pairs, beta=8, logt=8)
    dense = dense_random_walk(cams, affinity, pairs, beta=8, logt=8)
    assert (ours.argmax(0) == dense.argmax(0)).float().mean() >= 0.999
    torch.testing.assert_close(ours.double(), dense, rtol=1e-4, atol=1e-6)


def psa_aff_keys() -> set[str]:
    """The key set of PSA's resnet38_aff.Net, written from its layout (not from our modules)."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = {"conv1a.weight", *(f"bn7.{s}" for s in bn), "f8_3.weight", "f8_4.weight", "f8_5.weight", "f9.weight"}
    basic = ["b2", "b2_1", "b2_2", "b3", "b3_1", "b3_2", "b4", "b4_1", "b4_2", "b4_3", "b4_4", "b4_5",
             "b5", "b5_1", "b5_2"]
    for block in basic + ["b6", "b7"]:
        parts = ["bn_branch2a", "conv_branch2a", "bn_branch2b1", "conv_branch2b1"]
        if block in ("b6", "b7"):
            parts += ["bn_branch2b2", "conv_branch2b2"]
        if block in ("b2", "b3", "b4", "b5", "b6", "b7"):
            parts.append("conv_branch1")
        for part in parts:
            keys |= {f"{block}.{part}.weight"} if part.startswith("conv") else {f"{block}.{part}.{s}" for s in bn}
    return keys


def tiny_affinity_net(seed: int = 0) -> AffinityNet:
    from wsss_bench.components import create_backbone

    torch.manual_seed(seed)
    return AffinityNet(create_backbone("resnet38d", width=0.0625)).eval()


def test_affinity_net_has_psa_keys_and_loads_a_psa_file_strictly(tmp_path: Path) -> None:
    model = tiny_affinity_net()
    assert set(model.state_dict()) == psa_aff_keys()
    # A 2018 file: a plain state dict, no num_batches_tracked, no metadata of ours.
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "res38_aff.pth")
    from wsss_bench.components import create_refiner

    refiner = create_refiner("affinity-rw", weights=str(tmp_path / "res38_aff.pth"))
    assert refiner.protocol["backbone"] == {"name": "resnet38d", "options": {"width": 0.0625}}
    for key, value in refiner.model.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, state[key]), key


def psa_infer_aff(model: AffinityNet, image: Image.Image, cam_dict: dict[int, np.ndarray],
                  alpha: float = 16, beta: float = 8, logt: int = 8) -> np.ndarray:
    """PSA's infer_aff.py restated: pad, dense affinity matrix, squared transition, upsample."""
    w, h = image.size
    pixels = torch.from_numpy(normalize(image)).permute(2, 0, 1)
    ph, pw = int(np.ceil(h / 8) * 8), int(np.ceil(w / 8) * 8)
    pixels = F.pad(pixels, (0, pw - w, 0, ph - h))[None]
    with torch.no_grad():
        feats = model(pixels)[0].double()
    dh, dw = feats.shape[1:]
    src, dst = psa_pairs_by_loops(5, dh, dw)
    flat = feats.reshape(feats.shape[0], -1)
    aff = torch.exp(-(flat[:, dst] - flat[:, src]).abs().mean(0))
    n = dh * dw
    matrix = torch.eye(n, dtype=torch.float64)
    matrix[src, dst] = aff
    matrix[dst, src] = aff
    trans = matrix.pow(beta)
    trans = trans / trans.sum(0, keepdim=True)
    for _ in range(logt):
        trans = trans @ trans
    full = np.zeros((21, h, w), np.float32)
    for k, v in cam_dict.items():
        full[k + 1] = v
    full[0] = (1 - np.max(full[1:], axis=0)) ** alpha
    padded = F.pad(torch.from_numpy(full), (0, pw - w, 0, ph - h))
    pooled = F.avg_pool2d(padded[None], 8, 8)[0].double()
    walked = (pooled.reshape(21, -1) @ trans).reshape(1, 21, dh, dw)
    up = F.interpolate(walked, (ph, pw), mode="bilinear", align_corners=False)
    return up[0].argmax(0)[:h, :w].numpy().astype(np.uint8)


def test_wsss_refine_with_a_psa_checkpoint_gives_psa_labels(tmp_path: Path) -> None:
    root = write_voc_tree(tmp_path / "voc", {"train": ["a", "b"]}, num_classes=20, size=(45, 37))
    model = tiny_affinity_net(seed=3)
    torch.save({k: v for k, v in model.state_dict().items()}, tmp_path / "res38_aff.pth")
    cams_dir = tmp_path / "cams"
    rng = np.random.default_rng(0)
    dicts = {}
    for image_id in ("a", "b"):
        keys = np.array([2, 14])
        yy, xx = np.mgrid[0:37, 0:45]
        maps = np.stack([np.clip(1 - np.hypot(yy - c[0], xx - c[1]) / 20, 0, 1) for c in ((10, 12), (25, 33))])
        maps = (maps * rng.uniform(0.7, 1.0, (2, 1, 1))).astype(np.float32)
        maps /= maps.max(axis=(1, 2), keepdims=True)
        write_cam(cams_dir / f"{image_id}.npz", keys, maps)
        dicts[image_id] = dict(zip(keys.tolist(), maps))
    out = tmp_path / "masks"
    result = CliRunner().invoke(cli, ["refine", "--cams", str(cams_dir), "--data-root", str(root), "--split",
                                      "train", "--out", str(out), "--weights", str(tmp_path / "res38_aff.pth"),
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    for image_id in ("a", "b"):
        image = Image.open(root / "JPEGImages" / f"{image_id}.jpg").convert("RGB")
        expected = psa_infer_aff(model, image, dicts[image_id])
        with Image.open(out / f"{image_id}.png") as png:
            assert png.mode == "P"
            got = np.array(png)
        assert (got == expected).mean() >= 0.999, (got != expected).sum()
    summary = json.loads((out / "refine.json").read_text())
    assert summary["protocol"]["crf"] == "absent" and summary["protocol"]["weights_sha256"]
    # ...and the masks score under the same protocol as CAMs
    scored = CliRunner().invoke(cli, ["eval", "--masks", str(out), "--data-root", str(root), "--split", "train"])
    assert scored.exit_code == 0, scored.output
    assert "label maps with unsure pixels (255) scored as `background`" in scored.output


def test_refine_without_weights_is_one_line(tmp_path: Path) -> None:
    root = write_voc_tree(tmp_path / "voc", {"train": ["a"]})
    cams = tmp_path / "cams"
    write_cam(cams / "a.npz", np.array([0]), np.ones((1, 32, 40), np.float32))
    result = CliRunner().invoke(cli, ["refine", "--cams", str(cams), "--data-root", str(root), "--out",
                                      str(tmp_path / "out")])
    assert result.exit_code == 2 and "needs AffinityNet weights" in result.output
    assert "Traceback" not in result.output


class LabelsAClassTheImageLacks:
    def refine(self, image, cams, keys):  # noqa: ANN001 - deliberately broken refiner
        return np.full((image.size[1], image.size[0]), 9, np.uint8)


class BrokenRefiners:
    @hookimpl
    def register_refiners(self, register):
        register("wrong-class", LabelsAClassTheImageLacks, help="labels class 8 everywhere")


def test_refiner_output_is_checked_naming_its_plugin(tmp_path: Path) -> None:
    from wsss_bench.data.voc import open_split
    from wsss_bench.refinement import refine_folder

    root = write_voc_tree(tmp_path / "voc", {"train": ["a"]}, num_classes=10)
    write_cam(tmp_path / "cams" / "a.npz", np.array([0]), np.ones((1, 32, 40), np.float32))
    plugins.register_plugin(BrokenRefiners(), "broken_refiners")
    try:
        with pytest.raises(PluginError, match=r"refiner 'wrong-class' \(plugin 'broken_refiners'.*\[9\]"):
            refine_folder("wrong-class", {}, tmp_path / "cams", open_split(root, "train"), tmp_path / "out",
                          show_progress=False)
    finally:
        plugins.unregister_plugin("broken_refiners")
    assert not list((tmp_path / "out").glob("*.png")) if (tmp_path / "out").exists() else True


def test_eval_masks_ignore_policies_and_coverage(tmp_path: Path) -> None:
    from wsss_bench.data.voc import open_split
    from wsss_bench.evaluation.masks import evaluate_masks

    root = tmp_path / "voc"
    for sub in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    truth = np.zeros((4, 4), np.uint8)
    truth[:, 2:] = 1                                      # 8 background, 8 class-1 pixels
    Image.fromarray(truth).save(root / "SegmentationClassAug" / "x.png")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "JPEGImages" / "x.jpg")
    (root / "ImageSets/Segmentation/val.txt").write_text("x\n")
    (root / "class_names.txt").write_text("thing\n")
    pred = truth.copy()
    pred[:, 3] = 255                                      # the class's right column unsure
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.fromarray(pred, mode="L").save(masks / "x.png")  # a grey-level PNG, as PSA writes
    ds = open_split(root, "val")
    ignored = evaluate_masks(masks, ds, "ignore")
    counted = evaluate_masks(masks, ds, "background")
    assert ignored.miou == pytest.approx(1.0)             # only confident pixels scored: all right
    # background: bg IoU 8/12, class IoU 4/8
    assert counted.miou == pytest.approx((8 / 12 + 4 / 8) / 2)
    assert counted.protocol["coverage"] == pytest.approx(12 / 16) == ignored.protocol["coverage"]
    assert counted.per_class[1]["recall"] == pytest.approx(0.5)


def test_confident_labels_follow_psa_rule() -> None:
    from wsss_bench.engine.train_affinity import confident_labels

    # one class, 16x16 at stride 8: left half strong CAM, right half weak, bottom-right zero
    cams = np.zeros((1, 16, 16), np.float32)
    cams[0, :, :8] = 0.9          # (1-0.9)^4 = 1e-4 < 0.9: class; (1-.9)^32 ~ 0 < 0.9: not bg
    cams[0, :8, 8:] = 0.3         # (0.7)^4 = 0.24 < 0.3: class by fg rule... and (0.7)^32 ~ 1e-5 < 0.3
    cams[0, 8:, 8:] = 0.0         # background wins both stacks
    labels = confident_labels(cams, np.array([6]), stride=8)
    assert labels.tolist() == [[7, 7], [7, 0]]
    cams[0, :8, 8:] = 0.1         # (0.9)^4 = 0.66 > 0.1: not sure fg; (0.9)^32 = 0.034 < 0.1: not bg
    assert confident_labels(cams, np.array([6]), stride=8).tolist() == [[7, 255], [7, 0]]


def test_pair_label_sets() -> None:
    from wsss_bench.engine.train_affinity import pair_label_sets

    pairs = pair_indices(2, (2, 3))               # offsets (0,1), (1,-1), (1,0), (1,1); from = row 0, col 1
    labels = torch.tensor([[[0, 0, 3], [0, 255, 3]]])
    bg, fg, neg = pair_label_sets(labels, pairs)
    # from pixel (0,1)=0 to (0,2)=3, (1,0)=0, (1,1)=255, (1,2)=3
    assert bg.tolist() == [[False, True, False, False]]
    assert fg.tolist() == [[False, False, False, False]]
    assert neg.tolist() == [[True, False, False, True]]


def test_train_aff_then_refine_with_our_checkpoint(tmp_path: Path) -> None:
    root = write_voc_tree(tmp_path / "voc", {"train": [f"i{k}" for k in range(6)]}, num_classes=3, size=(48, 40))
    cams = tmp_path / "cams"
    from wsss_bench.data.voc import open_split

    ds = open_split(root, "train")
    for image_id in ds.ids:
        mask = ds.load_mask(image_id)
        keys = np.unique(mask[(mask > 0) & (mask < 255)]).astype(np.int64) - 1
        maps = np.stack([(mask == k + 1).astype(np.float32) * 0.8 + 0.1 for k in keys]) if len(keys) else \
            np.zeros((0, *mask.shape), np.float32)
        write_cam(cams / f"{image_id}.npz", keys, maps / np.maximum(maps.max(axis=(1, 2), keepdims=True), 1e-5))
    out = tmp_path / "aff"
    args = ["train-aff", "--cams", str(cams), "--data-root", str(root), "--split", "train", "--out", str(out),
            "--backbone", "resnet38d", "--set", "refine.options.backbone_options={width: 0.0625}",
            "--set", "refine.options.train={epochs: 2, batch_size: 3, crop_size: 72, lr: 0.01}", "--device", "cpu"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "train-aff.json").read_text())
    losses = summary["protocol"]["train_losses"]
    assert len(losses) == 2 and all(np.isfinite(losses))
    # the label stacks lived in a temporary folder beside the output, removed afterwards
    assert sorted(p.name for p in out.iterdir()) == ["affinity.pth", "train-aff.json"]
    masks = tmp_path / "masks"
    result = CliRunner().invoke(cli, ["refine", "--cams", str(cams), "--data-root", str(root), "--split", "train",
                                      "--out", str(masks), "--weights", str(out / "affinity.pth"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert len(list(masks.glob("*.png"))) == 6


def test_train_affinity_reads_its_labels_from_disk_and_cleans_up(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The label score stacks are written once and read back per batch (never all held in
    memory), the same stacks label_scores gives; the folder goes even when training fails."""
    from wsss_bench.data.voc import open_split
    from wsss_bench.engine import train_affinity as ta

    root = write_voc_tree(tmp_path / "voc", {"train": [f"i{k}" for k in range(4)]}, num_classes=3, size=(40, 32))
    ds = open_split(root, "train")
    cams = tmp_path / "cams"
    rng = np.random.default_rng(0)
    for image_id in ds.ids:
        write_cam(cams / f"{image_id}.npz", np.array([0, 2]), rng.random((2, 32, 40)).astype(np.float32))
    read: list[tuple[str, np.ndarray]] = []
    real_load = np.load

    def spy(path, *args, **kwargs):
        array = real_load(path, *args, **kwargs)
        if str(path).endswith(".npy"):    # the stacks (CAM files are .npz)
            read.append((str(path), np.asarray(array)))
        return array

    monkeypatch.setattr(ta.np, "load", spy)
    settings = ta.AffinityTraining(epochs=1, batch_size=2, crop_size=32, radius=2, crf="off")
    scratch = tmp_path / "scratch"
    ta.train_affinity(tiny_affinity_net(), ds, cams, settings, torch.device("cpu"), scratch=scratch)
    assert len(read) == 4 and list(scratch.iterdir()) == []
    stacks = {ta.label_scores(real_load(cams / f"{i}.npz")["cams"]).tobytes() for i in ds.ids}
    assert {array.tobytes() for _, array in read} == stacks

    def diverge(*args, **kwargs):
        raise ta.TrainingDiverged("boom")

    monkeypatch.setattr(ta, "affinity_loss", diverge)
    with pytest.raises(ta.TrainingDiverged):
        ta.train_affinity(tiny_affinity_net(), ds, cams, settings, torch.device("cpu"), scratch=scratch)
    assert list(scratch.iterdir()) == []
