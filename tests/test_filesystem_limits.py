"""The file system's limits (full disk, read-only mount) end in one line naming the file and
the cause, exit 2, and leave no partial file behind, in every command that writes.

Faults are injected at the system call the writer makes (``fsync``, ``write``, ``mkstemp``);
where this process may mount a small tmpfs (root on Linux) the same commands also run against a
real full and a real read-only file system.
"""
from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
from click.testing import CliRunner, Result

from tests.conftest import write_voc_tree
from wsss_bench.cli.main import cli

TINY = ["--device", "cpu", "--quiet", "--backbone", "resnet38d",
        "--set", "backbone.options={width: 0.0625, freeze_bn: false, freeze_stem: false}",
        "--set", "train.epochs=1", "--set", "train.crop_size=16", "--set", "train.resize_long=[16,16]"]
SYNTH = ["data", "synth", "--n-train-aug", "16", "--n-train", "8", "--n-val", "8", "--image-size", "48"]


def one_error_line(result: Result, *needles: str) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for needle in needles:
        assert needle in lines[0], result.output
    return lines[0]


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp") or ".tmp-" in p.name]


@pytest.fixture
def voc(tmp_path: Path) -> Path:
    ids = [f"img_{i:03d}" for i in range(6)]
    return write_voc_tree(tmp_path / "voc", {"train_aug": ids[:4], "train": ids[:2], "val": ids[4:]})


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to tell files apart")
def test_checkpoint_save_on_a_full_disk(voc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if ".round0.pth." in _fd_path(fd):  # the checkpoint's temporary file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "--data-root", str(voc), "--out", str(out), *TINY])
    one_error_line(result, str(out / "checkpoints" / "round0.pth"), "no space left on the device")
    assert not (out / "checkpoints" / "round0.pth").exists() and temp_files(tmp_path) == []


def test_data_synth_on_a_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = Path.write_bytes
    calls = {"n": 0}

    def write_bytes(self: Path, data: bytes) -> int:
        calls["n"] += 1
        if calls["n"] > 10:  # the disk fills up part-way through the tree
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    out = tmp_path / "tree"
    result = CliRunner().invoke(cli, [*SYNTH, "--out", str(out)])
    one_error_line(result, str(out), "no space left on the device")
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "a partial tree was left behind"


def test_read_only_output_folder(voc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    def mkstemp(*args: object, **kwargs: object) -> tuple[int, str]:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "--data-root", str(voc), "--out", str(out), *TINY])
    one_error_line(result, str(out), "read-only file system")
    assert temp_files(tmp_path) == [] and not (out / "checkpoints" / "round0.pth").exists()


# -- a real small file system -------------------------------------------------------------------
@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs under ``tmp_path`` (skipped where this process may not mount one)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.name != "posix" or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                          capture_output=True, timeout=30)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode(errors='replace').strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)


def test_a_real_full_and_read_only_file_system(voc: Path, small_fs: Path) -> None:
    # The classifier's checkpoint (and its resume state) does not fit in 1 MiB at this width.
    out = small_fs / "run"
    result = CliRunner().invoke(cli, ["train", "--data-root", str(voc), "--out", str(out), *TINY,
                                      "--set", "backbone.options={width: 0.25, freeze_bn: false, freeze_stem: false}"])
    one_error_line(result, str(out / "checkpoints"), "no space left on the device")
    assert temp_files(small_fs) == [] and not (out / "checkpoints" / "round0.pth").exists()

    for path in small_fs.iterdir():
        subprocess.run(["rm", "-rf", str(path)], check=True)
    tree = small_fs / "tree"
    result = CliRunner().invoke(cli, [*SYNTH, "--out", str(tree), "--n-train-aug", "400", "--image-size", "96"])
    one_error_line(result, str(tree), "no space left on the device")
    assert list(small_fs.iterdir()) == []

    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True, timeout=30)
    result = CliRunner().invoke(cli, ["train", "--data-root", str(voc), "--out", str(small_fs / "run"), *TINY])
    one_error_line(result, str(small_fs / "run"), "ead-only file system")
    result = CliRunner().invoke(cli, [*SYNTH, "--out", str(tree)])
    one_error_line(result, str(tree), "read-only file system")
