"""Determinism and crash recovery: a run killed with SIGKILL and resumed ends as if uninterrupted."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ARGS = ["--method", "subcat", "--device", "cpu", "--quiet", "--backbone", "resnet38d",
        "--set", "backbone.options={width: 0.0625, freeze_bn: false, freeze_stem: false}",
        "--set", "train.epochs=3", "--set", "train.crop_size=32", "--set", "train.resize_long=[32,48]",
        "--set", "cams.scales=[1.0,0.5]", "--set", "method.options={rounds: 1, k: 2}"]


def start(root: Path, out: Path, resume: bool = False) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "wsss_bench.cli.main", "run", "--data-root", str(root), "--out", str(out), *ARGS]
    if resume:
        cmd.append("--resume")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen) -> None:
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output.decode(errors="replace")


def cam_arrays(run: Path) -> dict[str, np.ndarray]:
    arrays = {}
    for path in sorted((run / "cams").rglob("*.npz")):
        with np.load(path) as data:
            arrays[str(path.relative_to(run))] = data["cams"].copy()
    return arrays


def assert_same_run(a: Path, b: Path) -> None:
    ra, rb = (json.loads((r / "results.json").read_text()) for r in (a, b))
    assert [r["miou"] for r in ra["rows"]] == [r["miou"] for r in rb["rows"]]
    ca, cb = cam_arrays(a), cam_arrays(b)
    assert ca.keys() == cb.keys() and ca
    for key in ca:
        assert np.array_equal(ca[key], cb[key]), key
    assert np.array_equal(np.load(a / "subcategories/round1.npy"), np.load(b / "subcategories/round1.npy"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from tests.conftest import write_voc_tree

    base = tmp_path_factory.mktemp("resume")
    ids = [f"img_{i:03d}" for i in range(12)]
    root = write_voc_tree(base / "voc", {"train_aug": ids[:8], "train": ids[:4], "val": ids[8:]})
    run = base / "reference"
    finish(start(root, run))
    return root, run


def test_same_seed_gives_bit_identical_cams(reference: tuple[Path, Path], tmp_path: Path) -> None:
    root, run = reference
    again = tmp_path / "again"
    finish(start(root, again))
    assert_same_run(run, again)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 300) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the kill point was never reached")


KILL_POINTS = {
    # mid-training: the per-epoch resume state of round 0 exists, the checkpoint does not yet
    "during round-0 training": lambda run: (run / "checkpoints/round0.state.pth").is_file(),
    # round 0 trained, CAM inference under way
    "during CAM inference": lambda run: any((run / "cams").rglob("*.npz")) if (run / "cams").is_dir() else False,
    # round 1 (sub-category head) training has started
    "during round-1 training": lambda run: (run / "checkpoints/round1.state.pth").is_file(),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_then_resume_matches_uninterrupted(point: str, reference: tuple[Path, Path], tmp_path: Path) -> None:
    root, run = reference
    out = tmp_path / "killed"
    killed = _kill_when(start(root, out), lambda: KILL_POINTS[point](out))
    assert killed, "the run finished before the kill point"
    assert not (out / "results.json").exists()
    finish(start(root, out, resume=True))
    assert_same_run(run, out)
    assert not [p for p in out.rglob(".*") if p.name.endswith((".tmp", ".link"))], "stale temporary files"


def resume_stages(root: Path, out: Path, *extra: str) -> dict[str, bool]:
    """Run again in ``out`` with --resume and ``extra`` flags; which stages were reused."""
    proc = subprocess.run([sys.executable, "-m", "wsss_bench.cli.main", "run", "--data-root", str(root),
                           "--out", str(out), *ARGS, "--resume", *extra],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {s["name"]: s["reused"] for s in json.loads((out / "manifest.json").read_text())["stages"]}


def test_rerun_recomputes_nothing_and_force_recomputes_one_stage(reference: tuple[Path, Path]) -> None:
    root, run = reference
    stages = resume_stages(root, run, "--force", "train:round1")
    assert stages["train:round0"] is True and stages["train:round1"] is False
    # the retrained round 1 is bit-identical, so its CAMs (same inputs) are kept, like round 0's
    assert stages["cams:round0:val"] is True and stages["cams:round1:val"] is True


def test_changed_setting_recomputes_only_dependent_stages(reference: tuple[Path, Path], tmp_path: Path) -> None:
    import shutil

    root, run = reference
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    stages = resume_stages(root, copy, "--set", "cams.scales=[1.0]")
    assert stages["train:round0"] is True and stages["train:round1"] is True
    assert stages["cams:round0:val"] is False and stages["cams:round1:train"] is False
    new, old = cam_arrays(copy), cam_arrays(run)
    assert new.keys() == old.keys()
    assert any(not np.array_equal(new[k], old[k]) for k in new), "CAMs were not recomputed"


def test_resume_recomputes_damaged_artifacts(reference: tuple[Path, Path], tmp_path: Path) -> None:
    """A truncated CAM file, a CAM file edited into another valid one and a truncated checkpoint
    are found on resume and recomputed: the run ends as the undamaged one, not failing on every
    retry (or, worse, scoring the edited file)."""
    import shutil

    root, run = reference
    copy = tmp_path / "damaged"
    shutil.copytree(run, copy)
    truncated = sorted((copy / "cams/round0/val").glob("*.npz"))[0]
    truncated.write_bytes(truncated.read_bytes()[:100])
    edited = sorted((copy / "cams/round1/train").glob("*.npz"))[0]
    with np.load(edited) as data:
        arrays = {k: data[k].copy() for k in data.files}
    arrays["cams"] = arrays["cams"] * 0.5  # still a valid CAM file: only its checksum tells
    with open(edited, "wb") as handle:
        np.savez(handle, **arrays)
    checkpoint = copy / "checkpoints/round1.pth"
    checkpoint.write_bytes(checkpoint.read_bytes()[:2000])
    stages = resume_stages(root, copy)
    assert stages["train:round0"] is True and stages["train:round1"] is False  # retrained
    assert_same_run(run, copy)
