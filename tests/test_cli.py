"""The command line: user errors end in one line and exit code 2; runs write their outputs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from wsss_bench.cli.main import cli
from wsss_bench.evaluation.camfiles import write_cam


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def assert_user_error(result, pattern: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert pattern in result.output, result.output


TINY = ["--set", "train.epochs=1", "--set", "train.crop_size=32", "--set", "train.resize_long=[32,48]",
        "--set", "cams.scales=[1.0]", "--backbone", "resnet38d", "--set", "backbone.options.width=0.0625",
        "--quiet", "--device", "cpu"]


def test_missing_data_root(tmp_path: Path) -> None:
    assert_user_error(invoke("run", "--data-root", str(tmp_path / "nope"), "--out", str(tmp_path / "o")),
                      "does not exist")
    assert not (tmp_path / "o").exists()


def test_unknown_plugin(tmp_path: Path) -> None:
    assert_user_error(invoke("run", "--method", "subcatt", "--out", str(tmp_path / "o")), "Did you mean 'subcat'")
    assert_user_error(invoke("run", "--backbone", "timm:resnet1888", "--dry-run"), "")


def test_invalid_config(tmp_path: Path) -> None:
    bad = tmp_path / "c.yaml"
    bad.write_text("train: {epochs: -1}\n")
    assert_user_error(invoke("run", "--config", str(bad), "--dry-run"), "train.epochs")
    bad.write_text("train: [1,\n")
    assert_user_error(invoke("run", "--config", str(bad), "--dry-run"), "invalid YAML")
    assert_user_error(invoke("run", "--set", "bogus=1", "--dry-run"), "bogus")


def test_empty_split(tiny_voc: Path, tmp_path: Path) -> None:
    (tiny_voc / "ImageSets/Segmentation/train.txt").write_text("\n")
    result = invoke("run", "--data-root", str(tiny_voc), "--out", str(tmp_path / "o"), *TINY)
    assert_user_error(result, "is empty")


def test_corrupt_image_in_run(tiny_voc: Path, tmp_path: Path) -> None:
    (tiny_voc / "JPEGImages/img_003.jpg").write_bytes(b"garbage")
    result = invoke("run", "--data-root", str(tiny_voc), "--out", str(tmp_path / "o"), *TINY)
    assert_user_error(result, "img_003.jpg: corrupt")
    assert not (tmp_path / "o" / "results.json").exists()


def test_run_on_a_user_tree_and_rescore(tiny_voc: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = invoke("run", "--data-root", str(tiny_voc), "--out", str(out), *TINY)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert set(results["miou"]) == {"train", "val"}
    assert 0.0 <= results["miou"]["val"] <= 1.0
    assert (out / "config.yaml").is_file() and (out / "results.md").is_file()
    assert (out / "checkpoints" / "round0.pth").is_file()
    cams = out / "cams" / "round0" / "val"
    assert sorted(p.stem for p in cams.glob("*.npz")) == ["img_008", "img_009", "img_010", "img_011"]
    # the same CAMs re-scored by `wsss eval` give the same number
    rescored = invoke("eval", "--cams", str(cams), "--data-root", str(tiny_voc), "--split", "val",
                      "--out", str(tmp_path / "ev"))
    assert rescored.exit_code == 0, rescored.output
    again = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert again["miou"]["val"] == pytest.approx(results["miou"]["val"], abs=1e-12)
    # an output folder in use is refused rather than overwritten
    assert_user_error(invoke("run", "--data-root", str(tiny_voc), "--out", str(out), *TINY), "not empty")


def test_eval_refuses_bad_cam_files(tiny_voc: Path, tmp_path: Path) -> None:
    cams = tmp_path / "cams"
    cams.mkdir()
    for i in range(8, 12):
        write_cam(cams / f"img_{i:03d}.npz", np.array([0]), np.zeros((1, 32, 40), np.float32))
    assert invoke("eval", "--cams", str(cams), "--data-root", str(tiny_voc), "--split", "val").exit_code == 0
    np.savez(cams / "img_009.npz", keys=np.array([0]), cams=np.zeros((1, 5, 5), np.float32))
    assert_user_error(invoke("eval", "--cams", str(cams), "--data-root", str(tiny_voc), "--split", "val"),
                      "img_009.npz: maps are 5x5")
    np.save(cams / "x.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (cams / "x.npy").rename(cams / "img_009.npz")
    assert_user_error(invoke("eval", "--cams", str(cams), "--data-root", str(tiny_voc), "--split", "val"),
                      "img_009.npz")
    (cams / "img_010.npz").unlink()
    assert_user_error(invoke("eval", "--cams", str(cams), "--data-root", str(tiny_voc), "--split", "val"),
                      "no CAM file for 1 of 4")


def test_eval_scores_the_prefix_a_limited_run_inferred(tiny_voc: Path, tmp_path: Path) -> None:
    cams = tmp_path / "cams"
    cams.mkdir()
    for i in (8, 9):   # what a run with dataset.max_images=2 writes for the 4-image val split
        write_cam(cams / f"img_{i:03d}.npz", np.array([0]), np.zeros((1, 32, 40), np.float32))
    args = ["eval", "--cams", str(cams), "--data-root", str(tiny_voc), "--split", "val"]
    assert_user_error(invoke(*args), "the first 2 are there (--max-images 2 scores them)")
    result = invoke(*args, "--max-images", "2", "--out", str(tmp_path / "ev"))
    assert result.exit_code == 0, result.output
    scored = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert scored["rows"][0]["num_images"] == 2
    assert "seed None" not in result.output and "(-)" not in result.output  # files have neither
    # a hole in the middle is not a prefix: no hint, and --max-images does not hide it
    (cams / "img_008.npz").unlink()
    result = invoke(*args, "--max-images", "2")
    assert_user_error(result, "no CAM file for 1 of 2")
    assert "--max-images" not in result.output


def test_device_errors() -> None:
    import torch

    if not torch.cuda.is_available():
        assert_user_error(invoke("run", "--device", "cuda", "--preset", "smoke", "--out", "/tmp/never"), "CUDA is not available")
    assert_user_error(invoke("run", "--device", "tpu", "--preset", "smoke", "--out", "/tmp/never"), "unknown device")
