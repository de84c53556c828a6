"""The segmentation stage: DeepLab-v2 (ASPP) trained on pseudo masks, predictions, ``wsss segment``.

The tree is made here: flat grey images with a red square (class 1) and a blue disk (class 2),
ground truth = the shapes, pseudo masks = the ground truth with unsure (255) outlines and specks.
The backbone is a 1/16-width ResNet-38 trained from scratch (colour is enough to learn).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

from wsss_bench.cli.main import cli
from wsss_bench.data.voc import IGNORE_INDEX, open_split, read_mask
from wsss_bench.engine import segmentation as seg
from wsss_bench.engine.segmentation import (DeepLabASPP, SegmentOptions, build_segmentation, load_segmentation,
                                            predict_probs, predict_split, save_segmentation, segmentation_loss,
                                            train_segmentation)
from wsss_bench.errors import ConfigError
from wsss_bench.evaluation.masks import evaluate_masks
from wsss_bench.evaluation.pseudo_masks import palette_png_bytes

CPU = torch.device("cpu")
W, H = 64, 56          # not square: catches a swapped width and height
BACKBONE = "resnet38d"
BACKBONE_OPTIONS = {"width": 0.0625, "freeze_bn": False, "freeze_stem": False, "dropout": False}
#: Small and quick (about 4 s): 56 px crops of 64x56 images, enough steps to learn the colours.
FAST = {"epochs": 30, "batch_size": 2, "crop_size": 56, "resize_long": [64, 80], "lr": 0.002,
        "head_lr_mult": 10.0, "aspp_rates": [1, 2]}
BACKBONE_SETS = ["--backbone", BACKBONE] + [a for k, v in BACKBONE_OPTIONS.items()
                                             for a in ("--set", f"segment.backbone.options.{k}={str(v).lower()}")]


def shapes_tree(root: Path, n_train: int = 8, n_val: int = 4, seed: int = 0) -> Path:
    """A VOC tree (``train``, ``val``) and ``root/pseudo`` (pseudo masks of ``train``)."""
    rng = np.random.default_rng(seed)
    for folder in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation", "pseudo"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    ids = [f"im{i:02d}" for i in range(n_train + n_val)]
    yy, xx = np.mgrid[0:H, 0:W]
    for n, image_id in enumerate(ids):
        mask = np.zeros((H, W), np.uint8)
        s = int(rng.integers(12, 17))
        y, x = int(rng.integers(0, H - s)), int(rng.integers(0, W // 2 - s // 2))
        mask[y:y + s, x:x + s] = 1
        if n % 3:  # two of three images also hold a disk, on the right half
            r = int(rng.integers(6, 9))
            cy, cx = int(rng.integers(r, H - r)), int(rng.integers(W // 2 + r // 2, W - r))
            mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 2
        colours = np.array([[128, 128, 128], [210, 40, 40], [40, 40, 210]], np.float64)
        image = colours[mask] + rng.normal(0, 8, (H, W, 3))
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / "JPEGImages" / f"{image_id}.jpg",
                                                                      quality=95)
        Image.fromarray(mask, mode="L").save(root / "SegmentationClassAug" / f"{image_id}.png")
        pseudo = mask.copy()
        edge = (np.abs(np.diff(mask.astype(int), axis=0, prepend=0)) + np.abs(np.diff(mask.astype(int), axis=1,
                                                                                        prepend=0))) > 0
        pseudo[edge] = IGNORE_INDEX
        pseudo[rng.random((H, W)) < 0.03] = IGNORE_INDEX
        (root / "pseudo" / f"{image_id}.png").write_bytes(palette_png_bytes(pseudo))
    (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(ids[:n_train]) + "\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(ids[n_train:]) + "\n")
    (root / "class_names.txt").write_text("square\ndisk\n")
    return root


def new_model(options: SegmentOptions) -> DeepLabASPP:
    return build_segmentation(BACKBONE, BACKBONE_OPTIONS, 2, options)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shapes_tree(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def trained(tree: Path) -> tuple[DeepLabASPP, seg.SegmentTrainReport]:
    options = SegmentOptions(**FAST)
    model = new_model(options)
    # The thread count changes float reduction order, and this short training from scratch
    # follows it (val mIoU 0.55 on 2 threads, 0.41 on 1): pinned, so every machine trains alike.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        report = train_segmentation(model, open_split(tree, "train"), tree / "pseudo", options, CPU,
                                    show_progress=False)
    finally:
        torch.set_num_threads(threads)
    return model, report


def run_cli(*args: Any) -> Any:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def assert_one_line_error(result: Any, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# -- the loss and the head --------------------------------------------------------------------------
def test_loss_ignores_unsure_pixels() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 6, 5, generator=gen, requires_grad=True)
    labels = torch.randint(0, 3, (2, 6, 5), generator=gen)
    labels[0, :3] = IGNORE_INDEX
    labels[1, :, :2] = IGNORE_INDEX
    loss = segmentation_loss(logits, labels)
    loss.backward()
    ignored = (labels == IGNORE_INDEX).unsqueeze(1).expand_as(logits)
    assert logits.grad is not None and torch.count_nonzero(logits.grad[ignored]) == 0
    assert torch.count_nonzero(logits.grad[~ignored]) > 0
    keep = labels != IGNORE_INDEX    # the mean over the labelled pixels only
    expected = F.cross_entropy(logits.detach().permute(0, 2, 3, 1)[keep], labels[keep])
    torch.testing.assert_close(loss.detach(), expected)
    # No labelled pixel at all: zero loss and no gradient, not PyTorch's NaN (0 / 0).
    empty = torch.zeros(1, 3, 4, 4, requires_grad=True)
    none = segmentation_loss(empty, torch.full((1, 8, 8), IGNORE_INDEX))
    none.backward()
    assert float(none.detach()) == 0.0 and torch.count_nonzero(empty.grad) == 0


def test_head_is_deeplab_v2_aspp() -> None:
    options = SegmentOptions(aspp_rates=[1, 2, 3])
    model = new_model(options)
    assert [c.dilation for c in model.aspp] == [(1, 1), (2, 2), (3, 3)] and model.num_classes == 2
    x = torch.randn(2, 3, H, W)
    model.eval()
    with torch.no_grad():
        out = model(x)
        feats = model.backbone(x)
        summed = sum(conv(feats) for conv in model.aspp)
    assert out.shape == (2, 3, H // model.stride, W // model.stride)
    torch.testing.assert_close(out, summed)        # branches summed, as v2 (no concat / 1x1 fusion)
    groups = model.param_groups(0.1, 10.0)
    assert [g["lr"] for g in groups] == [0.1, 1.0]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.aspp.parameters()}
    # A backbone that freezes BN keeps it frozen when the whole model trains.
    frozen = build_segmentation(BACKBONE, {**BACKBONE_OPTIONS, "freeze_bn": True}, 2, options).train()
    bns = [m for m in frozen.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    with pytest.raises(Exception):
        SegmentOptions(aspp_rates=[])
    with pytest.raises(Exception):
        SegmentOptions(lr=float("nan"))


# -- training and prediction ------------------------------------------------------------------------
def test_training_learns_and_predictions_score(tree: Path, trained: Any, tmp_path: Path) -> None:
    model, report = trained
    assert report.images == 8 and 0.8 < report.pixels_labelled < 1.0
    assert len(report.epoch_losses) == FAST["epochs"]
    assert report.epoch_losses[-1] < 0.6 * report.epoch_losses[0], report.epoch_losses
    train = open_split(tree, "train")
    out = tmp_path / "pred"
    assert predict_split(model, train, out, SegmentOptions(**FAST), CPU, show_progress=False) == 8
    with Image.open(out / f"{train.ids[0]}.png") as img:
        assert img.mode == "P" and img.size == (W, H)         # single channel, VOC palette
        assert img.getpalette()[3:6] == [128, 0, 0]
    assert set(np.unique(read_mask(out / f"{train.ids[0]}.png", 2))) <= {0, 1, 2}
    result = evaluate_masks(out, train, stage="seg")
    # All background scores about 0.31 here (background IoU ~0.93, the shapes 0); a network that
    # learned the shapes is well above it.  The ceiling is low: at stride 8 a 64x56 image is an
    # 8x7 map, and a disk spans one or two of its cells.
    assert result.miou > 0.45, result.per_class
    scored = run_cli("eval", "--masks", out, "--data-root", tree, "--split", "train", "--device", "cpu")
    assert scored.exit_code == 0, scored.output
    assert f"{100 * result.miou:.1f}" in scored.output


def test_ignored_pixels_give_no_gradient_in_training(tree: Path, tmp_path: Path) -> None:
    """Masks that are 255 everywhere but a square of class 2: if 255 leaked in as background
    (or anything else), the network would learn it; it learns class 2 everywhere instead."""
    train = open_split(tree, "train").subset(4)
    masks = tmp_path / "only_disk"
    masks.mkdir()
    for image_id in train.ids:
        mask = np.full((H, W), IGNORE_INDEX, np.uint8)
        mask[10:20, 10:20] = 2
        (masks / f"{image_id}.png").write_bytes(palette_png_bytes(mask))
    options = SegmentOptions(**{**FAST, "epochs": 2})
    model = new_model(options)
    report = train_segmentation(model, train, masks, options, CPU, show_progress=False)
    assert report.pixels_labelled == pytest.approx(100 / (W * H))
    probs = predict_probs(model, train.load_image(train.ids[0]), options, CPU)
    assert (probs.argmax(0) == 2).all()


def test_same_seed_same_weights_and_resume(tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train = open_split(tree, "train").subset(4)
    options = SegmentOptions(**{**FAST, "epochs": 2, "seed": 3, "batch_size": 4})

    def weights(state_file: Path | None = None) -> dict[str, torch.Tensor]:
        model = new_model(options)
        train_segmentation(model, train, tree / "pseudo", options, CPU, show_progress=False,
                           state_file=state_file, state_key="k")
        return model.state_dict()

    first, second = weights(), weights()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    # The seed is what decides: another seed starts from other weights.
    initial, other = (new_model(SegmentOptions(**{**FAST, "seed": s})).state_dict() for s in (3, 4))
    assert not all(torch.equal(initial[k], other[k]) for k in initial)
    # Killed in its second epoch, then run again: continues after epoch 1, same final weights.
    state = tmp_path / "seg.state.pth"
    calls = {"n": 0}
    real_loss = seg.segmentation_loss

    def dying_loss(*args: Any) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] > 1:   # 4 images, batch 4: one step per epoch, so this is epoch 2
            raise KeyboardInterrupt
        return real_loss(*args)

    monkeypatch.setattr(seg, "segmentation_loss", dying_loss)
    with pytest.raises(KeyboardInterrupt):
        weights(state)
    monkeypatch.setattr(seg, "segmentation_loss", real_loss)
    assert state.is_file()
    resumed = weights(state)
    assert all(torch.equal(first[k], resumed[k]) for k in first)


def test_diverging_training_stops(tree: Path, tmp_path: Path) -> None:
    from wsss_bench.engine.train import TrainingDiverged

    options = SegmentOptions(**{**FAST, "epochs": 1, "lr": 1e30})
    with pytest.raises(TrainingDiverged, match="segment.options.lr"):
        train_segmentation(new_model(options), open_split(tree, "train").subset(4), tree / "pseudo", options, CPU,
                           show_progress=False)


def test_save_load_round_trip(tree: Path, trained: Any, tmp_path: Path) -> None:
    model, _ = trained
    path = tmp_path / "segment.pth"
    save_segmentation(path, model, {"options": SegmentOptions(**FAST).model_dump(mode="json")})
    loaded = load_segmentation(path)
    assert loaded.meta["kind"] == "segmentation" and loaded.meta["backbone"]["name"] == BACKBONE
    assert loaded.rates == model.rates and loaded.num_classes == 2
    options = SegmentOptions(**{**FAST, "infer_scales": [1.0, 1.5], "infer_flip": True})
    image = open_split(tree, "val").load_image("im09")
    model.eval()
    np.testing.assert_array_equal(predict_probs(model, image, options, CPU),
                                  predict_probs(loaded, image, options, CPU))
    probs = predict_probs(loaded, image, options, CPU)
    assert probs.shape == (3, H, W) and np.allclose(probs.sum(0), 1, atol=1e-5)


def test_crf_post_processing_is_wired(tree: Path, trained: Any, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from wsss_bench.engine import dense_crf

    model, _ = trained
    val = open_split(tree, "val")
    options = SegmentOptions(**{**FAST, "crf": True})
    if not dense_crf.crf_available():  # without the [crf] extra: one line, before any file
        with pytest.raises(ConfigError, match=r"\[crf\]"):
            predict_split(model, val, tmp_path / "none", options, CPU, show_progress=False)
        assert not list((tmp_path / "none").glob("*.png"))
    seen = []

    def fake_crf(image: np.ndarray, probs: np.ndarray) -> np.ndarray:
        seen.append((image.dtype, image.shape, probs.shape))
        out = np.zeros_like(probs)
        out[1] = 1.0       # the "CRF" says class 1 everywhere
        return out

    monkeypatch.setattr(dense_crf, "require_crf", lambda: None)
    monkeypatch.setattr(dense_crf, "dense_crf", fake_crf)
    assert predict_split(model, val, tmp_path / "crf", options, CPU, show_progress=False) == 4
    assert seen == [(np.uint8, (H, W, 3), (3, H, W))] * 4
    assert (read_mask(tmp_path / "crf" / "im08.png", 2) == 1).all()


# -- wsss segment -----------------------------------------------------------------------------------
def test_cli_end_to_end(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "seg"
    sets = [a for k, v in FAST.items() if k != "epochs"
            for a in ("--set", f"segment.options.{k}={json.dumps(v)}")]
    result = run_cli("segment", "--masks", tree / "pseudo", "--data-root", tree, "--train-split", "train",
                     "--eval-split", "val", "--eval-split", "train", "--out", out, *BACKBONE_SETS, *sets,
                     "--set", "segment.options.epochs=3", "--device", "cpu", "--seed", "1")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "segment.json").read_text())
    assert summary["backbone"] == {"name": BACKBONE, "options": BACKBONE_OPTIONS}
    assert summary["options"]["seed"] == 1 and summary["options"]["epochs"] == 3
    assert len(summary["train"]["epoch_losses"]) == 3 and summary["train"]["images"] == 8
    assert set(summary["miou"]) == {"val", "train"}
    assert summary["splits"]["train"]["seen"] and not summary["splits"]["val"]["seen"]
    assert summary["splits"]["val"]["protocol"]["stage"] == "seg"
    assert "seg (seen)" in result.output and "| val | seg |" in result.output
    assert (out / "segment.pth").is_file() and not (out / "segment.state.pth").exists()
    assert sorted(p.stem for p in (out / "pred" / "val").glob("*.png")) == ["im08", "im09", "im10", "im11"]
    # --weights: no training, the same label maps.
    again = run_cli("segment", "--weights", out / "segment.pth", "--data-root", tree, "--eval-split", "val",
                    "--out", tmp_path / "again", "--device", "cpu")
    assert again.exit_code == 0, again.output
    for path in (out / "pred" / "val").glob("*.png"):
        assert path.read_bytes() == (tmp_path / "again" / "pred" / "val" / path.name).read_bytes()
    assert json.loads((tmp_path / "again" / "segment.json").read_text())["train"] is None


def _masks_with(tree: Path, folder: Path, change: Any) -> Path:
    folder.mkdir()
    for path in sorted((tree / "pseudo").glob("*.png")):
        (folder / path.name).write_bytes(path.read_bytes())
    change(folder)
    return folder


@pytest.mark.parametrize("case", ["missing", "size", "value", "all_unsure"])
def test_cli_refuses_bad_masks(tree: Path, tmp_path: Path, case: str) -> None:
    def missing(folder: Path) -> None:
        (folder / "im03.png").unlink()
        (folder / "im05.png").unlink()

    def size(folder: Path) -> None:
        (folder / "im02.png").write_bytes(palette_png_bytes(np.zeros((H + 1, W), np.uint8)))

    def value(folder: Path) -> None:
        bad = np.zeros((H, W), np.uint8)
        bad[3, 4] = 7
        (folder / "im01.png").write_bytes(palette_png_bytes(bad))

    def all_unsure(folder: Path) -> None:
        for path in folder.glob("*.png"):
            path.write_bytes(palette_png_bytes(np.full((H, W), IGNORE_INDEX, np.uint8)))

    changes = {"missing": (missing, ["2 of 8", "im03.png"]), "size": (size, ["im02.png", f"{W}x{H + 1}", f"{W}x{H}"]),
               "value": (value, ["im01.png", "[7]"]), "all_unsure": (all_unsure, ["no labelled pixel"])}
    change, fragments = changes[case]
    masks = _masks_with(tree, tmp_path / case, change)
    result = run_cli("segment", "--masks", masks, "--data-root", tree, "--out", tmp_path / "out", *BACKBONE_SETS,
                     "--device", "cpu")
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "out" / "segment.pth").exists()


@pytest.mark.parametrize("args, fragment", [
    (["--set", "segment.options.lr=-1"], "segment.options"),
    (["--set", "segment.options.nope=1"], "nope"),
    (["--set", "train.lr=1"], "segment.options.KEY"),
    ([], "--masks DIR"),
])
def test_cli_refuses_bad_settings(tree: Path, tmp_path: Path, args: list[str], fragment: str) -> None:
    masks = [] if not args else ["--masks", tree / "pseudo"]
    result = run_cli("segment", *masks, "--data-root", tree, "--out", tmp_path / "out", *args, "--device", "cpu")
    assert_one_line_error(result, fragment)
