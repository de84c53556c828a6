"""Two CPU processes under torchrun (gloo): sharded CAM inference and DDP training.

Each test launches ``python -m torch.distributed.run --standalone --nproc_per_node 2`` on the
real CLI, so process-group set-up, rank-0-only writes, barriers and the shard split are all
exercised as a user would run them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from wsss_bench import checkpoints, create_backbone
from wsss_bench.cli.main import cli
from wsss_bench.engine.model import Classifier

WIDTH = 0.0625
COMMON = ["--data-root", None, "--backbone", "resnet38d",
          "--set", f"backbone.options={{width: {WIDTH}, freeze_bn: false, freeze_stem: false}}",
          "--set", "cams.scales=[1.0, 0.5]", "--set", "cams.flip=true", "--device", "cpu", "--quiet"]


def _common(root: Path) -> list[str]:
    return [str(root) if a is None else a for a in COMMON]


def torchrun(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "wsss_bench.cli.main", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    backbone = create_backbone("resnet38d", width=WIDTH, freeze_bn=False, freeze_stem=False)
    path = tmp_path / "model.pth"
    checkpoints.save_checkpoint(path, Classifier(backbone, 3).eval(), {"tag": "test"})
    return path


def test_two_process_cams_equal_one_process(tiny_voc: Path, checkpoint: Path, tmp_path: Path) -> None:
    single, double = tmp_path / "single", tmp_path / "double"
    args = ["cams", "--weights", str(checkpoint), "--split", "train_aug", "--split", "val", *_common(tiny_voc)]
    # The same number of threads per process (torchrun's workers get 1): float reductions then
    # run in the same order and the maps can be compared bit for bit.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = CliRunner().invoke(cli, [*args, "--out", str(single)])
    finally:
        torch.set_num_threads(threads)
    assert one.exit_code == 0, one.output
    two = torchrun([*args, "--out", str(double)])
    for split in ("train_aug", "val"):
        a_dir, b_dir = single / "cams" / "final" / split, double / "cams" / "final" / split
        names = sorted(p.name for p in a_dir.glob("*.npz"))
        assert names and names == sorted(p.name for p in b_dir.glob("*.npz"))
        for name in names:
            with np.load(a_dir / name) as a, np.load(b_dir / name) as b:
                assert np.array_equal(a["keys"], b["keys"])
                assert np.array_equal(a["cams"], b["cams"]), name
    # Rank 0 alone reports, with the single-process numbers.
    lines = [line for line in two.stdout.splitlines() if "mIoU" in line]
    assert len(lines) == 2
    assert sorted(lines) == sorted(line.replace(str(single), str(double))
                                   for line in one.output.splitlines() if "mIoU" in line)


def test_two_process_subcat_run_trains_clusters_and_scores(tiny_voc: Path, tmp_path: Path) -> None:
    # SC-CAM end to end: two DDP trainings, features and clustering on rank 0, sharded CAMs.
    out = tmp_path / "run"
    two = torchrun(["run", "--method", "subcat", "--out", str(out), *_common(tiny_voc),
                    "--set", "method.options={rounds: 1, k: 2}",
                    "--set", "train.epochs=2", "--set", "train.batch_size=4", "--set", "train.crop_size=32",
                    "--set", "train.resize_long=[32, 48]", "--set", "dataset.eval_splits=[val]"])
    assert two.stdout.count("run directory:") == 1
    results = json.loads((out / "results.json").read_text())
    assert np.isfinite(results["miou"]["val"])
    assert sorted({r["round"] for r in results["rows"]}) == [0, 1]
    for tag in ("round0", "round1"):
        losses = results["extra"]["training"][tag]["losses"]
        assert len(losses) == 2 and all(np.isfinite(v) for epoch in losses for v in epoch.values())
        assert checkpoints.read_checkpoint(out / "checkpoints" / f"{tag}.pth")["meta"]["tag"] == tag
        assert len(list((out / "cams" / tag / "val").glob("*.npz"))) == 4
    assignment = np.load(out / "subcategories" / "round1.npy", allow_pickle=False)
    assert assignment.shape == (8, 3) and assignment.max() < 2
    assert not list(out.rglob("*.state.pth"))  # the resume file is gone once training ends


def test_two_process_training_matches_one_process(tiny_voc: Path, tmp_path: Path) -> None:
    # With BatchNorm frozen and no dropout, DDP's averaged gradient of two half batches is the
    # single-process gradient of the whole batch: the weights must agree up to float noise.
    args = ["train", *_common(tiny_voc), "--set",
            f"backbone.options={{width: {WIDTH}, freeze_bn: true, freeze_stem: false, dropout: false}}",
            "--set", "train.epochs=2", "--set", "train.batch_size=4", "--set", "train.crop_size=32",
            "--set", "train.resize_long=[32, 48]", "--set", "train.head_dropout=0.0"]
    one = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    two = torchrun([*args, "--out", str(tmp_path / "two")])
    assert two.stdout.count("checkpoint:") == 1  # rank 0 alone reports
    a = checkpoints.read_checkpoint(tmp_path / "one" / "checkpoints" / "round0.pth")["state_dict"]
    b = checkpoints.read_checkpoint(tmp_path / "two" / "checkpoints" / "round0.pth")["state_dict"]
    assert a.keys() == b.keys()
    gap = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert gap < 1e-4
    # ...and training did move the weights away from the (seed-0) initialisation.
    torch.manual_seed(0)
    backbone = create_backbone("resnet38d", width=WIDTH, freeze_bn=True, freeze_stem=False, dropout=False)
    init = {f"{k}": v for k, v in Classifier(backbone, 3, head_dropout=0.0).state_dict().items()}
    assert float((a["heads.parent.weight"] - init["heads.parent.weight"]).abs().max()) > 100 * gap
