"""Threshold policies (one-pass sweep, fixed / oracle / heldout, AUC, plots) and export-masks."""
from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from wsss_bench.cli.cmd_export import DEFAULT_THRESHOLD as CLI_DEFAULT_THRESHOLD
from wsss_bench.cli.cmd_export import register
from wsss_bench.data.voc import voc_palette as voc_colormap
from wsss_bench.evaluation.pseudo_masks import DEFAULT_THRESHOLD, export_masks
from wsss_bench.cli.common import WsssGroup
from wsss_bench.data.voc import open_split, read_mask
from wsss_bench.errors import CamFileError, ConfigError
from wsss_bench.evaluation.camfiles import read_cam, write_cam
from wsss_bench.evaluation.evaluate import evaluate_cams
from wsss_bench.evaluation.miou import cams_to_labels
from wsss_bench.evaluation.thresholds import (
    DEFAULT_GRID, apply_policy, best_threshold, compare_policies, load_curve, plot_curves,
    robustness_auc, save_curve, sweep_confusions, threshold_grid,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GRID = threshold_grid(0.0, 0.6, 0.05)  # coarse grid keeps the tests fast


def random_cams(tiny_voc: Path, cam_dir: Path, split: str, seed: int = 0) -> None:
    """Random CAMs for each image's GT classes, with some scores exactly at grid thresholds."""
    rng = np.random.default_rng(seed)
    ds = open_split(tiny_voc, split)
    for n, image_id in enumerate(ds.ids):
        mask = ds.load_mask(image_id)
        keys = np.flatnonzero(ds.label(image_id))
        if n == 1:  # an image without any foreground map: background everywhere
            keys = keys[:0]
        cams = rng.random((len(keys), *mask.shape)).astype(np.float32)
        if len(keys):
            # Ties at the threshold are where an off-by-one in the sweep would show.
            cams[:, :4, :] = np.float32(0.15)
            cams[:, 4:8, :] = np.float32(0.5)
            cams[:, 8:10, :] = 0.0
        write_cam(cam_dir / f"{image_id}.npz", keys, cams)


def separable_cams(tiny_voc: Path, cam_dir: Path, split: str, fg: float, bg: float) -> None:
    """CAMs scoring ``fg`` on each class's GT pixels and ``bg`` elsewhere: every threshold in
    ``[bg, fg)`` gives perfect labels, others do not."""
    ds = open_split(tiny_voc, split)
    for image_id in ds.ids:
        mask = ds.load_mask(image_id)
        keys = np.flatnonzero(ds.label(image_id))
        cams = np.stack([np.where(mask == k + 1, fg, bg) for k in keys]).astype(np.float32)
        write_cam(cam_dir / f"{image_id}.npz", keys, cams)


def test_default_grid() -> None:
    assert len(DEFAULT_GRID) == 96 and DEFAULT_GRID[0] == 0.0 and DEFAULT_GRID[-1] == 0.95
    assert 0.15 in DEFAULT_GRID  # exact float, not 0.15000000000000002


def test_sweep_equals_separate_evaluations(tiny_voc: Path, tmp_path: Path) -> None:
    cams = tmp_path / "cams"
    random_cams(tiny_voc, cams, "train_aug")
    ds = open_split(tiny_voc, "train_aug")
    # Unsorted, with a duplicate and values exactly equal to CAM scores.
    thresholds = [0.5, 0.0, 0.15, 0.3, 0.15, 0.99, 0.05]
    sweep = sweep_confusions(cams, ds, thresholds, "cpu")
    assert sweep.shape == (len(thresholds), 4, 4) and sweep.dtype == np.int64
    for t, confusion in zip(thresholds, sweep):
        np.testing.assert_array_equal(confusion, evaluate_cams(cams, ds, t, "cpu").confusion)


def test_policies_oracle_is_upper_bound(tiny_voc: Path, tmp_path: Path) -> None:
    cams = tmp_path / "cams"
    random_cams(tiny_voc, cams, "train_aug", seed=1)
    ds_train, ds_val = open_split(tiny_voc, "train"), open_split(tiny_voc, "val")
    random_cams(tiny_voc, cams, "val", seed=2)
    reports = compare_policies(cams, ds_train, grid=GRID, selection_dataset=ds_val)
    fixed, oracle, heldout = reports["fixed"], reports["oracle"], reports["heldout"]
    assert oracle.miou >= fixed.miou and oracle.miou >= heldout.miou
    assert oracle.upper_bound and "upper bound" in oracle.protocol["note"]
    assert not fixed.upper_bound and not heldout.upper_bound
    assert heldout.protocol["selection_split"] == "val"
    # Reports agree with the plain evaluator at their threshold.
    for report in reports.values():
        assert report.miou == pytest.approx(evaluate_cams(cams, ds_train, report.threshold).miou)
        assert [row["class"] for row in report.per_class] == ["background", "class1", "class2", "class3"]
    # apply_policy gives the same numbers as the side-by-side call.
    single = apply_policy("oracle", cams, ds_train, grid=GRID)
    assert single.threshold == oracle.threshold and single.miou == oracle.miou
    json.dumps(oracle.to_dict())  # JSON-ready
    assert oracle.to_eval_result().protocol["threshold_policy"] == "oracle"


def test_heldout_threshold_comes_from_selection_split(tiny_voc: Path, tmp_path: Path) -> None:
    cams = tmp_path / "cams"
    # Selection split (train): perfect for t in [0.40, 0.60) -> chosen 0.40 (lowest of the ties).
    separable_cams(tiny_voc, cams, "train", fg=0.6, bg=0.4)
    # Evaluated split (val): perfect for t in [0.10, 0.30); at 0.40 everything is background.
    separable_cams(tiny_voc, cams, "val", fg=0.3, bg=0.1)
    ds_train, ds_val = open_split(tiny_voc, "train"), open_split(tiny_voc, "val")
    heldout = apply_policy("heldout", cams, ds_val, grid=GRID, selection_dataset=ds_train)
    oracle = apply_policy("oracle", cams, ds_val, grid=GRID)
    fixed = apply_policy("fixed", cams, ds_val, grid=GRID, threshold=0.15)
    assert heldout.threshold == pytest.approx(0.40)
    assert best_threshold(heldout.selection_curve) == heldout.threshold
    assert heldout.selection_miou == pytest.approx(1.0)
    assert oracle.threshold == pytest.approx(0.10) and oracle.miou == pytest.approx(1.0)
    assert fixed.miou == pytest.approx(1.0)
    assert heldout.miou < 0.5 < oracle.miou  # background only: only the bg class scores
    # A selection split sharing images with the evaluated one is refused.
    with pytest.raises(ConfigError, match="shares 4 images"):
        apply_policy("heldout", cams, ds_train, grid=GRID, selection_dataset=ds_train)
    with pytest.raises(ConfigError, match="unknown threshold policy"):
        apply_policy("best", cams, ds_val)


def test_robustness_auc(tiny_voc: Path, tmp_path: Path) -> None:
    assert robustness_auc([(0.0, 1.0), (0.5, 1.0), (1.0, 1.0)]) == pytest.approx(1.0)
    assert robustness_auc([(0.0, 0.0), (1.0, 1.0)]) == pytest.approx(0.5)
    assert robustness_auc([(0.2, 0.7)]) == pytest.approx(0.7)
    # Perfect CAMs (1 on the object, 0 elsewhere) are perfect at every grid threshold.
    cams = tmp_path / "cams"
    separable_cams(tiny_voc, cams, "val", fg=1.0, bg=0.0)
    report = apply_policy("fixed", cams, open_split(tiny_voc, "val"))  # default 0.00..0.95 grid
    assert len(report.curve) == 96 and report.auc == pytest.approx(1.0)
    random_cams(tiny_voc, cams, "train", seed=3)
    noisy = apply_policy("oracle", cams, open_split(tiny_voc, "train"), grid=GRID)
    assert 0.0 <= noisy.auc <= noisy.miou <= 1.0


def test_save_and_plot_curves(tmp_path: Path) -> None:
    curve = [(0.0, 0.2), (0.1, 0.5), (0.2, float("nan")), (0.3, 0.4)]
    save_curve(tmp_path / "curve.json", curve, meta={"split": "val"})
    raw = json.loads((tmp_path / "curve.json").read_text())
    assert raw["split"] == "val" and raw["best_threshold"] == 0.1 and raw["curve"][2][1] is None
    back = load_curve(tmp_path / "curve.json")
    assert back[1] == (0.1, 0.5) and np.isnan(back[2][1])
    png = tmp_path / "plots" / "curves.png"
    plot_curves(png, {"train": curve, "val": [(0.0, 0.1), (0.3, 0.3)]},
                marks={"train": 0.1, "fixed": 0.15})
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC)
    with Image.open(png) as img:
        img.verify()
    assert [p.name for p in png.parent.iterdir()] == ["curves.png"]  # no temporary left behind


def test_voc_colormap() -> None:
    cmap = voc_colormap()
    assert cmap.shape == (256, 3)
    assert cmap[0].tolist() == [0, 0, 0] and cmap[1].tolist() == [128, 0, 0]
    assert cmap[15].tolist() == [192, 128, 128] and cmap[255].tolist() == [224, 224, 192]


def test_export_masks_round_trip_and_band(tiny_voc: Path, tmp_path: Path) -> None:
    cams, out = tmp_path / "cams", tmp_path / "masks"
    random_cams(tiny_voc, cams, "train", seed=4)
    ds = open_split(tiny_voc, "train")
    assert export_masks(cams, ds, out, threshold=0.3) == len(ds.ids)
    for image_id in ds.ids:
        keys, maps = read_cam(cams / f"{image_id}.npz")
        expected = cams_to_labels(keys, torch.from_numpy(maps), 0.3).numpy()
        with Image.open(out / f"{image_id}.png") as img:
            assert img.mode == "P"
            assert list(img.getpalette()[:6]) == [0, 0, 0, 128, 0, 0]
        np.testing.assert_array_equal(read_mask(out / f"{image_id}.png", ds.num_classes), expected)

    band_out = tmp_path / "band"
    export_masks(cams, ds, band_out, band=(0.15, 0.5))
    for image_id in ds.ids:
        keys, maps = read_cam(cams / f"{image_id}.npz")
        best = maps.max(axis=0) if len(keys) else np.full(maps.shape[1:], -1.0)
        got = read_mask(band_out / f"{image_id}.png", ds.num_classes)
        np.testing.assert_array_equal(got == 255, (best > 0.15) & (best <= 0.5))
        np.testing.assert_array_equal(got == 0, best <= 0.15)
        high = best > 0.5
        labels = cams_to_labels(keys, torch.from_numpy(maps), 0.5).numpy()
        np.testing.assert_array_equal(got[high], labels[high])
        if len(keys):  # the planted exact values sit on the band's edges
            assert (got[:4] == 0).all() and (got[4:8] == 255).all()
    with pytest.raises(ConfigError, match="LOW < HIGH"):
        export_masks(cams, ds, band_out, band=(0.5, 0.2))


def _cli() -> click.Group:
    @click.group(cls=WsssGroup)
    def group() -> None:
        """Test group."""

    register(group)
    return group


def test_export_masks_cli(tiny_voc: Path, tmp_path: Path) -> None:
    cams, out = tmp_path / "cams", tmp_path / "masks"
    random_cams(tiny_voc, cams, "train", seed=5)
    runner = CliRunner()
    base = ["export-masks", "--cams", str(cams), "--data-root", str(tiny_voc), "--split", "train",
            "--device", "cpu"]
    result = runner.invoke(_cli(), [*base, "--out", str(out), "--band", "0.05", "0.3"])
    assert result.exit_code == 0, result.output
    assert "wrote 4 masks" in result.output and len(list(out.glob("*.png"))) == 4

    result = runner.invoke(_cli(), [*base, "--out", str(out), "--band", "0.05", "0.3",
                                    "--threshold", "0.2"])
    assert result.exit_code == 2 and "not both" in result.output

    # A split id without a CAM file: exit 2, one clear line, nothing written.
    (cams / "img_002.npz").unlink()
    empty = tmp_path / "none"
    result = runner.invoke(_cli(), [*base, "--out", str(empty)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "no CAM file for 1 of 4" in result.output and "img_002.npz" in result.output
    assert not empty.exists()


def test_export_stops_on_invalid_cam_without_partial_file(tiny_voc: Path, tmp_path: Path) -> None:
    cams, out = tmp_path / "cams", tmp_path / "masks"
    random_cams(tiny_voc, cams, "train", seed=6)
    keys, maps = read_cam(cams / "img_002.npz")
    write_cam(cams / "img_002.npz", keys, maps + 2.0)  # not normalised: fails validation
    with pytest.raises(CamFileError, match="img_002.npz: maps must be normalised"):
        export_masks(cams, open_split(tiny_voc, "train"), out)
    assert sorted(p.name for p in out.iterdir()) == ["img_000.png", "img_001.png"]


def test_cli_and_library_share_the_default_threshold() -> None:
    assert CLI_DEFAULT_THRESHOLD == DEFAULT_THRESHOLD == 0.15
