"""Atomic writes: a failing write (disk full, unwritable folder) keeps the earlier file intact."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from wsss_bench import io
from wsss_bench.errors import UserError


def test_disk_full_keeps_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "results.json"
    io.write_json(target, {"miou": 0.5})

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(UserError, match="results.json: cannot write output .*no space left"):
        io.write_json(target, {"miou": 0.9})
    assert '"miou": 0.5' in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temp file left


def test_unwritable_folder_is_a_clear_error(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # root ignores permission bits; a path under a regular file is unwritable for everyone
        blocker = tmp_path / "file"
        blocker.write_text("x")
        folder = blocker / "sub"
    else:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o500)
    with pytest.raises(UserError, match="cannot write output"):
        io.write_text(folder / "out.txt", "data")
