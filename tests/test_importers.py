"""``wsss import``: foreign CAM files become valid ``.npz`` CAM files, or fail cleanly."""
from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any, Callable

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from wsss_bench.cli.cmd_import import import_command, register
from wsss_bench.cli.common import WsssGroup
from wsss_bench.errors import CamFileError, UserError
from wsss_bench.evaluation.camfiles import read_cam
from wsss_bench.importers import ImportSummary, import_cams

H, W = 12, 16


@click.group(cls=WsssGroup)
def group() -> None:
    """A stand-in for the ``wsss`` group: the same UserError -> exit 2 handling."""


register(group)
assert group.commands["import"] is import_command


def run(*args: Any):
    return CliRunner().invoke(group, ["import", *map(str, args)])


def assert_user_error(result, *patterns: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for pattern in patterns:
        assert pattern in result.output, result.output


def outputs(folder: Path) -> list[str]:
    """Everything in the output folder (including hidden staging leftovers)."""
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def smooth_maps(n: int, seed: int = 0, h: int = H, w: int = W) -> np.ndarray:
    rng = np.random.default_rng(seed)
    maps = rng.random((n, h, w))
    return maps / (maps.max(axis=(1, 2), keepdims=True) + 1e-5)


def save_pickle(path: Path, obj: Any) -> None:
    np.save(path, obj, allow_pickle=True)


def irn_dict(keys: list[int], seed: int = 0, torch_arrays: bool = True) -> dict:
    """What IRN's make_cam.py saves: torch keys/cam, numpy high_res."""
    high = smooth_maps(len(keys), seed).astype(np.float32)
    cam = high[:, ::4, ::4].copy()
    k = np.array(keys, np.int64)
    if torch_arrays:
        return {"keys": torch.from_numpy(k), "cam": torch.from_numpy(cam), "high_res": high}
    return {"keys": k, "cam": cam, "high_res": high}


# ------------------------------------------------------------------------------------------
# Each format converts and reads back


def test_irn_roundtrip(tmp_path: Path) -> None:
    src, out = tmp_path / "irn", tmp_path / "out"
    src.mkdir()
    data = {"a": irn_dict([0, 14], 1), "b": irn_dict([6], 2, torch_arrays=False)}
    for image_id, d in data.items():
        save_pickle(src / f"{image_id}.npy", d)
    result = run("--format", "irn", src, "--out", out, "--trust-pickle")
    assert result.exit_code == 0, result.output
    assert "converted 2 files" in result.output
    assert "0 binarised, 0 renormalised, 0 skipped" in result.output
    for image_id, d in data.items():
        keys, cams = read_cam(out / f"{image_id}.npz", num_classes=20, size=(H, W))
        assert keys.tolist() == np.asarray(d["keys"]).tolist()
        np.testing.assert_allclose(cams, d["high_res"], atol=1e-6)
    assert outputs(out) == ["a.npz", "b.npz"]  # staging folder removed


def test_irn_padded_keys(tmp_path: Path) -> None:
    src, out = tmp_path / "irn", tmp_path / "out"
    src.mkdir()
    d = irn_dict([2, 11], torch_arrays=False)
    d["keys"] = np.pad(d["keys"] + 1, (1, 0))  # eval-time form [0, 3, 12]
    save_pickle(src / "x.npy", d)
    summary = import_cams("irn", src, out, trust_pickle=True)
    assert summary.padded_keys == ["x"]
    keys, cams = read_cam(out / "x.npz", num_classes=20)
    assert keys.tolist() == [2, 11]
    np.testing.assert_allclose(cams, d["high_res"], atol=1e-6)


def test_irn_without_high_res_needs_size(tmp_path: Path) -> None:
    src, out, voc = tmp_path / "irn", tmp_path / "out", tmp_path / "voc"
    src.mkdir()
    d = irn_dict([4], torch_arrays=False)
    del d["high_res"]
    save_pickle(src / "img1.npy", d)
    result = run("--format", "irn", src, "--out", out, "--trust-pickle")
    assert_user_error(result, "img1.npy", "--size-from")
    assert not out.exists()

    (voc / "JPEGImages").mkdir(parents=True)
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(voc / "JPEGImages" / "img1.jpg")
    result = run("--format", "irn", src, "--out", out, "--trust-pickle", "--size-from", voc)
    assert result.exit_code == 0, result.output
    assert "upsampled" in result.output
    keys, cams = read_cam(out / "img1.npz", num_classes=20, size=(H, W))
    assert keys.tolist() == [4] and cams.shape == (1, H, W)


def test_size_from_checks_map_size(tmp_path: Path) -> None:
    src, out, voc = tmp_path / "irn", tmp_path / "out", tmp_path / "voc"
    src.mkdir()
    save_pickle(src / "img1.npy", irn_dict([4]))
    (voc / "JPEGImages").mkdir(parents=True)
    Image.fromarray(np.zeros((H + 1, W, 3), np.uint8)).save(voc / "JPEGImages" / "img1.jpg")
    result = run("--format", "irn", src, "--out", out, "--trust-pickle", "--size-from", voc)
    assert_user_error(result, "img1.npy", "but the image is")
    assert not out.exists()


@pytest.mark.parametrize("fmt", ["psa", "sccam"])
def test_psa_roundtrip(tmp_path: Path, fmt: str) -> None:
    src, out = tmp_path / "psa", tmp_path / "out"
    src.mkdir()
    maps = smooth_maps(2, 3)  # float64, like PSA
    save_pickle(src / "2007_000032.npy", {14: maps[1], 0: maps[0]})
    summary = import_cams(fmt, src, out, trust_pickle=True)
    assert summary.converted == ["2007_000032"] and not summary.binarised
    keys, cams = read_cam(out / "2007_000032.npz", num_classes=20, size=(H, W))
    assert keys.tolist() == [0, 14]
    np.testing.assert_allclose(cams, maps, atol=1e-6)


def test_sccam_binarised_detected(tmp_path: Path) -> None:
    src, out = tmp_path / "sccam", tmp_path / "out"
    src.mkdir()
    binary = np.where(smooth_maps(1)[0] > 0.15, 255.0, 0.0)
    save_pickle(src / "a.npy", {3: binary, 7: binary.copy()})
    save_pickle(src / "b.npy", {5: smooth_maps(1)[0]})  # a continuous one is left alone
    result = run("--format", "sccam", src, "--out", out, "--trust-pickle")
    assert result.exit_code == 0, result.output
    warning_lines = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warning_lines) == 1 and "binarised" in warning_lines[0]
    assert "1 binarised, 0 renormalised" in result.output
    keys, cams = read_cam(out / "a.npz", num_classes=20)
    assert keys.tolist() == [3, 7]
    np.testing.assert_array_equal(cams[0], binary / 255)


def test_binarised_warning_in_api(tmp_path: Path) -> None:
    src = tmp_path / "sccam"
    src.mkdir()
    save_pickle(src / "a.npy", {3: np.array([[0.0, 255.0], [255.0, 0.0]])})
    with pytest.warns(UserWarning, match="binarised"):
        summary = import_cams("sccam", src, tmp_path / "out", trust_pickle=True)
    assert summary.binarised == ["a"] and summary.binarised_maps == 1


def test_npy_dir_dense(tmp_path: Path) -> None:
    src, out = tmp_path / "dense", tmp_path / "out"
    src.mkdir()
    dense = np.zeros((20, H, W), np.float32)
    dense[[1, 9]] = smooth_maps(2, 4)
    np.save(src / "a.npy", dense)
    summary = import_cams("npy-dir", src, out)
    assert summary.converted == ["a"]
    keys, cams = read_cam(out / "a.npz", num_classes=20, size=(H, W))
    assert keys.tolist() == [1, 9]
    np.testing.assert_allclose(cams, dense[[1, 9]], atol=1e-6)


def test_npy_dir_background_and_labels(tmp_path: Path) -> None:
    src, out = tmp_path / "dense", tmp_path / "out"
    src.mkdir()
    dense = np.zeros((21, H, W), np.float32)
    dense[0] = 0.5  # background channel, dropped
    dense[[3, 4]] = smooth_maps(2, 5)  # classes 2 and 3
    np.save(src / "a.npy", dense)
    labels = tmp_path / "cls_labels.json"
    labels.write_text(json.dumps({"a": [2, 7]}))  # 7 labelled but all-zero map: kept; 3 dropped
    result = run("--format", "npy-dir", src, "--out", out, "--has-background", "--labels", labels)
    assert result.exit_code == 0, result.output
    keys, cams = read_cam(out / "a.npz", num_classes=20)
    assert keys.tolist() == [2, 7]
    np.testing.assert_allclose(cams[0], dense[3], atol=1e-6)
    assert not cams[1].any()


def test_npy_dir_labels_from_voc_masks(tmp_path: Path) -> None:
    src, out, voc = tmp_path / "dense", tmp_path / "out", tmp_path / "voc"
    src.mkdir()
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "SegmentationClassAug").mkdir()
    mask = np.zeros((H, W), np.uint8)
    mask[2:5, 2:5] = 6  # class id 5
    mask[0] = 255
    Image.fromarray(mask, mode="L").save(voc / "SegmentationClassAug" / "a.png")
    dense = smooth_maps(20, 6).astype(np.float32)  # every class has a non-zero map
    np.save(src / "a.npy", dense)
    import_cams("npy-dir", src, out, labels=voc)
    keys, _ = read_cam(out / "a.npz", num_classes=20)
    assert keys.tolist() == [5]


def test_npy_dir_refuses_pickles_even_when_trusted(tmp_path: Path) -> None:
    src, out = tmp_path / "dense", tmp_path / "out"
    src.mkdir()
    save_pickle(src / "a.npy", {"x": 1})
    result = run("--format", "npy-dir", src, "--out", out, "--trust-pickle")
    assert_user_error(result, "a.npy", "pickled")
    assert not out.exists()


# ------------------------------------------------------------------------------------------
# Normalisation


def test_out_of_range_maps_renormalised(tmp_path: Path) -> None:
    src, out = tmp_path / "psa", tmp_path / "out"
    src.mkdir()
    raw = smooth_maps(2, 7) * np.array([3.0, 0.5])[:, None, None]  # first out of range
    raw[1, 0, 0] = -0.2  # negative: clipped, and counts as out of range
    save_pickle(src / "a.npy", {1: raw[0], 2: raw[1]})
    result = run("--format", "psa", src, "--out", out, "--trust-pickle")
    assert result.exit_code == 0, result.output
    assert "0 binarised, 1 renormalised" in result.output
    keys, cams = read_cam(out / "a.npz", num_classes=20)
    np.testing.assert_allclose(cams[0], raw[0] / (raw[0].max() + 1e-5), atol=1e-6)
    expected = np.clip(raw[1], 0, None)
    np.testing.assert_allclose(cams[1], expected / (expected.max() + 1e-5), atol=1e-6)
    assert cams.min() >= 0 and cams.max() <= 1

    out2 = tmp_path / "out2"
    result = run("--format", "psa", src, "--out", out2, "--trust-pickle", "--no-normalize")
    assert_user_error(result, "a.npy", "outside [0, 1]")
    assert not out2.exists()


# ------------------------------------------------------------------------------------------
# Refusals and malformed inputs


@pytest.mark.parametrize("fmt", ["irn", "psa", "sccam"])
def test_pickle_refused_without_trust(tmp_path: Path, fmt: str) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    save_pickle(src / "evil.npy", {"keys": np.array([0]), "x": Evil()})
    result = run("--format", fmt, src, "--out", out)
    assert_user_error(result, "evil.npy", "pickled files can run code when loaded",
                      "--trust-pickle")
    assert not marker.exists()  # refused before unpickling
    assert not out.exists()


def test_raw_pickle_refused(tmp_path: Path) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "a.npy").write_bytes(pickle.dumps({0: np.zeros((2, 2))}))
    assert_user_error(run("--format", "psa", src, "--out", out), "a.npy", "--trust-pickle")


def _write(obj: Any) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        if isinstance(obj, bytes):
            path.write_bytes(obj)
        elif isinstance(obj, np.ndarray) and not obj.dtype.hasobject:
            np.save(path, obj)
        else:
            save_pickle(path, obj)
    return write


def _irn(**changes: Any) -> dict:
    d = irn_dict([1, 2], torch_arrays=False)
    d.update(changes)
    return {k: v for k, v in d.items() if v is not None}


def _truncated(path: Path) -> None:
    np.save(path, np.zeros((20, H, W), np.float32))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


_nan = smooth_maps(2)
_nan[1, 3, 3] = np.nan
_inf_dense = np.zeros((20, H, W), np.float32)
_inf_dense[0, 0, 0] = np.inf

MALFORMED = {
    "irn-no-keys": ("irn", _write(_irn(keys=None)), "no 'keys'"),
    "irn-no-maps": ("irn", _write(_irn(high_res=None, cam=None)), "neither 'high_res' nor 'cam'"),
    "irn-count": ("irn", _write(_irn(keys=np.array([1, 2, 3]))), "3 keys but 2 maps"),
    "irn-nan": ("irn", _write(_irn(high_res=_nan)), "NaN or Inf"),
    "irn-range": ("irn", _write(_irn(keys=np.array([1, 20]))), "outside 0..19"),
    "irn-dup": ("irn", _write(_irn(keys=np.array([2, 2]))), "duplicate"),
    "irn-float-keys": ("irn", _write(_irn(keys=np.array([1.0, 2.0]))), "1-D integer"),
    "irn-2d-maps": ("irn", _write(_irn(high_res=np.zeros((H, W)))), "[n, H, W]"),
    "irn-str-maps": ("irn", _write(_irn(high_res=np.full((2, H, W), "a"))), "numeric"),
    "psa-list": ("psa", _write(np.array([1, 2], dtype=object)), "expected a dict"),
    "psa-plain": ("psa", _write(np.zeros((2, H, W))), "expected a pickled dict"),
    "psa-str-key": ("psa", _write({"cat": np.zeros((H, W))}), "integer class ids"),
    "psa-shapes": ("psa", _write({0: np.zeros((H, W)), 1: np.zeros((H, W + 1))}), "others are"),
    "psa-3d": ("psa", _write({0: np.zeros((1, H, W))}), "[H, W]"),
    "psa-empty": ("psa", _write({}), "no class maps"),
    "psa-inf": ("sccam", _write({0: np.full((H, W), np.inf)}), "NaN or Inf"),
    "dense-channels": ("npy-dir", _write(np.zeros((19, H, W), np.float32)), "19 channels"),
    "dense-inf": ("npy-dir", _write(_inf_dense), "NaN or Inf"),
    "dense-bool": ("npy-dir", _write(np.zeros((20, H, W), bool)), "numeric"),
    "garbage": ("npy-dir", _write(b"this is not numpy"), "not a .npy file"),
    "truncated": ("npy-dir", _truncated, "unreadable"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_input(tmp_path: Path, case: str) -> None:
    fmt, write, pattern = MALFORMED[case]
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    # A good file sorted first: it converts, yet must not be left behind as partial output.
    if fmt == "npy-dir":
        good = np.zeros((20, H, W), np.float32)
        good[0] = smooth_maps(1)[0]
        np.save(src / "a_good.npy", good)
    elif fmt == "irn":
        save_pickle(src / "a_good.npy", irn_dict([1]))
    else:
        save_pickle(src / "a_good.npy", {1: smooth_maps(1)[0]})
    write(src / "bad.npy")
    result = run("--format", fmt, src, "--out", out, "--trust-pickle")
    assert_user_error(result, "bad.npy", pattern)
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not out.exists()  # created by us, removed again since nothing was committed
    with pytest.raises(CamFileError, match="bad.npy"):
        import_cams(fmt, src, out, trust_pickle=True)


def test_skip_invalid(tmp_path: Path) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    save_pickle(src / "a.npy", {1: smooth_maps(1)[0]})
    save_pickle(src / "b.npy", {1: np.full((H, W), np.nan)})
    (src / "README.txt").write_text("notes")
    result = run("--format", "psa", src, "--out", out, "--trust-pickle", "--skip-invalid")
    assert result.exit_code == 0, result.output
    assert "converted 1 files" in result.output and "2 skipped" in result.output
    assert "skipped b.npy: map of class 1 contains NaN or Inf" in result.output
    assert outputs(out) == ["a.npz"]

    # Everything invalid is still an error, even with --skip-invalid.
    (out / "a.npz").unlink()
    (src / "a.npy").unlink()
    assert_user_error(run("--format", "psa", src, "--out", out, "--trust-pickle", "--skip-invalid"),
                      "none of the 1 input files", "b.npy")


def test_existing_output_needs_overwrite(tmp_path: Path) -> None:
    src, out = tmp_path / "psa", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    save_pickle(src / "a.npy", {1: smooth_maps(1, 1)[0]})
    save_pickle(src / "b.npy", {2: smooth_maps(1, 2)[0]})
    (out / "unrelated.txt").write_text("keep me")
    (out / "b.npz").write_bytes(b"old")

    result = run("--format", "psa", src, "--out", out, "--trust-pickle")
    assert_user_error(result, "b.npz", "already exists", "--overwrite")
    assert outputs(out) == ["b.npz", "unrelated.txt"]  # not even a.npz was written
    assert (out / "b.npz").read_bytes() == b"old"

    result = run("--format", "psa", src, "--out", out, "--trust-pickle", "--overwrite")
    assert result.exit_code == 0, result.output
    assert outputs(out) == ["a.npz", "b.npz", "unrelated.txt"]
    keys, _ = read_cam(out / "b.npz", num_classes=20)
    assert keys.tolist() == [2]
    assert (out / "unrelated.txt").read_text() == "keep me"


def test_bad_arguments(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    assert_user_error(run("--format", "psa", tmp_path / "nope", "--out", tmp_path / "o"),
                      "does not exist")
    assert_user_error(run("--format", "psa", src, "--out", tmp_path / "o"), "no <id>.npy files")
    np.save(src / "a.npy", np.zeros((20, 2, 2), np.float32))
    assert_user_error(run("--format", "psa", src, "--out", tmp_path / "o", "--has-background"),
                      "only apply to --format npy-dir")
    with pytest.raises(UserError, match="unknown CAM format"):
        import_cams("bogus", src, tmp_path / "o")


def test_api_summary(tmp_path: Path) -> None:
    src, out = tmp_path / "irn", tmp_path / "nested" / "out"
    src.mkdir()
    save_pickle(src / "a.npy", irn_dict([1]))
    summary = import_cams("irn", src, out, trust_pickle=True, num_classes=2)
    assert isinstance(summary, ImportSummary)
    assert summary.converted == ["a"] and summary.skipped == []
    assert summary.lines()[0].startswith("converted 1 files (irn)")
    read_cam(out / "a.npz", num_classes=2)
