"""One writer per run folder: a live holder refuses a second writer, a dead one does not."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import write_voc_tree
from wsss_bench.orchestration import runlock
from wsss_bench.cli.main import cli

HOLD = """
import sys, time
from wsss_bench.orchestration import runlock
runlock.acquire(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""

TINY = ["--device", "cpu", "--quiet", "--backbone", "resnet38d",
        "--set", "backbone.options={width: 0.0625, freeze_bn: false, freeze_stem: false}",
        "--set", "train.epochs=1", "--set", "train.crop_size=16", "--set", "train.resize_long=[16,16]"]


def hold(folder: Path) -> subprocess.Popen:
    """A separate process that locks ``folder`` and sleeps (like a run in progress)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_writer_gets_one_line_naming_the_holder(tmp_path: Path) -> None:
    root = write_voc_tree(tmp_path / "voc", {"train_aug": ["a", "b"], "train": ["a"], "val": ["b"]})
    out = tmp_path / "run"
    runlock.mark_run_folder(out)
    holder = hold(out)
    try:
        result = CliRunner().invoke(cli, ["train", "--data-root", str(root), "--out", str(out), *TINY])
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
        assert f"process {holder.pid}" in lines[0] and "in use" in lines[0], result.output
        assert not (out / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "run"
    runlock.mark_run_folder(folder)
    holder = hold(folder)
    recorded = json.loads((folder / runlock.LOCK_NAME).read_text())
    assert recorded["pid"] == holder.pid
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with caplog.at_level("INFO", logger="wsss_bench"):
        runlock.acquire(folder)
    try:
        assert runlock.held(folder)
        assert f"process {holder.pid}" in caplog.text and "has ended" in caplog.text
        assert json.loads((folder / runlock.LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        runlock.release(folder)
    assert not runlock.held(folder) and (folder / runlock.LOCK_NAME).read_text() == ""


def test_acquire_is_reentrant_within_a_process(tmp_path: Path) -> None:
    runlock.acquire(tmp_path)
    runlock.acquire(tmp_path)
    runlock.release(tmp_path)
    assert runlock.held(tmp_path)
    runlock.release(tmp_path)
    assert not runlock.held(tmp_path)


def test_two_resumed_runs_into_one_folder_cannot_both_succeed(tmp_path: Path) -> None:
    ids = [f"img_{i:03d}" for i in range(6)]
    root = write_voc_tree(tmp_path / "voc", {"train_aug": ids[:4], "train": ids[:2], "val": ids[4:]})
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "wsss_bench.cli.main", "run", "--method", "cam", "--data-root", str(root),
           "--out", str(out), "--resume", *TINY]
    # The first run trains long enough to still be writing when the second one starts.
    first = subprocess.Popen([*cmd, "--set", "train.epochs=5000"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "checkpoints" / "round0.state.pth").is_file():
            assert first.poll() is None, first.communicate()[0]
            time.sleep(0.05)
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert first.poll() is None, "the first run ended before the second one started"
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"in use by process {first.pid}" in second.stderr and "Traceback" not in second.stderr
        assert not (out / "results.json").exists()
    finally:
        first.kill()
        first.wait()
