"""Progress off a terminal: log lines, never bar frames, in a redirected run's output."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from wsss_bench.progress import epoch_line


def test_epoch_line_names_loss_speed_and_eta():
    line = epoch_line("round1", 2, 8, {"parent": 0.41234, "sub": 1.5}, 87.25, 125.4)
    assert line == "round1 epoch 2/8: loss parent 0.4123, sub 1.5000 | 87.2 images/s | ETA 2m05s"


def test_redirected_run_writes_lines_not_bar_frames(tmp_path: Path, tiny_voc: Path):
    log_file = tmp_path / "run.log"
    cmd = [sys.executable, "-m", "wsss_bench.cli.main", "run", "--method", "cam", "--data-root", str(tiny_voc),
           "--out", str(tmp_path / "run"), "--device", "cpu", "--backbone", "resnet38d",
           "--set", "backbone.options={width: 0.0625}", "--set", "train.epochs=2",
           "--set", "train.crop_size=32", "--set", "train.resize_long=[32,48]", "--set", "cams.scales=[1.0]",
           "--set", "eval.policies=[fixed]"]
    with open(log_file, "w") as handle:
        done = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              env={**os.environ, "COLUMNS": "80"}, timeout=600)
    text = log_file.read_text()
    assert done.returncode == 0, text
    assert "\r" not in text and "it/s" not in text  # no tqdm frame anywhere
    assert "round0 epoch 1/2: loss parent" in text and "round0 epoch 2/2: loss parent" in text
    assert "images/s | ETA" in text
    assert "cams train: 4 done in" in text and "cams val: 4 done in" in text
