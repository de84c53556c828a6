"""The shared stage store: a stored folder is published by one rename of a finished folder, so
writers racing on one stage (two cells, two machines on one store) never leave a mixed or
half-written entry."""
from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest

from wsss_bench.orchestration.stage_cache import COMPLETE, StageCache, publish_tree, unique_suffix

FILES = 40


def _writer_folder(base: Path, writer: int) -> Path:
    """A finished output folder whose every file names its writer."""
    folder = base / f"out{writer}"
    folder.mkdir(parents=True)
    for i in range(FILES):
        (folder / f"{i:03d}.npz").write_text(f"writer {writer}")
    return folder


def _race(source: str, stored: str, barrier, rounds: int) -> None:
    for r in range(rounds):
        barrier.wait()
        publish_tree(Path(source), Path(stored) / f"key{r}")


def test_racing_writers_leave_one_complete_entry(tmp_path: Path) -> None:
    rounds = 25
    sources = [_writer_folder(tmp_path, w) for w in (0, 1)]
    store = tmp_path / "store" / "cams"
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_race, args=(str(s), str(store), barrier, rounds)) for s in sources]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    for r in range(rounds):
        entry = store / f"key{r}"
        assert (entry / COMPLETE).is_file()
        contents = {f.read_text() for f in entry.glob("*.npz")}
        assert len(list(entry.glob("*.npz"))) == FILES and len(contents) == 1, (r, contents)
    # nothing of the losing copies is left behind
    assert sorted(p.name for p in store.iterdir()) == sorted(f"key{r}" for r in range(rounds))


def test_an_entry_left_incomplete_is_replaced(tmp_path: Path) -> None:
    source = _writer_folder(tmp_path, 1)
    stored = tmp_path / "store" / "key"
    stored.mkdir(parents=True)
    (stored / "000.npz").write_text("a dead writer's file")   # no COMPLETE marker
    cache = StageCache(store=tmp_path / "store")
    stage = cache.stage("cams:round0:val", "cams", {"x": 1})
    assert not stage.stored_folder()
    publish_tree(source, stored)
    assert (stored / COMPLETE).is_file() and {f.read_text() for f in stored.glob("*.npz")} == {"writer 1"}
    assert [p.name for p in stored.parent.iterdir()] == ["key"]


def test_a_published_entry_is_kept(tmp_path: Path) -> None:
    first, second = _writer_folder(tmp_path, 0), _writer_folder(tmp_path, 1)
    stored = tmp_path / "store" / "key"
    publish_tree(first, stored)
    publish_tree(second, stored)
    assert {f.read_text() for f in stored.glob("*.npz")} == {"writer 0"}
    assert [p.name for p in stored.parent.iterdir()] == ["key"]


@pytest.mark.parametrize("n", [50])
def test_temporary_names_differ_per_writer(n: int) -> None:
    import os
    import socket

    names = {unique_suffix() for _ in range(n)}
    assert len(names) == n
    assert all(name.startswith(f"{socket.gethostname()}.{os.getpid()}.") for name in names)


def test_a_paused_stage_does_not_count_the_pause(tmp_path: Path) -> None:
    """A split's CAM stage is paused while the next split's CAMs are inferred: its time in the
    manifest is its own inference and scoring."""
    import time

    stage = StageCache().stage("cams:round0:train", "cams", {"x": 1})
    stage.pause()
    time.sleep(0.3)
    stage.resume()
    assert time.perf_counter() - stage.started < 0.2
    stage.pause()
    time.sleep(0.3)
    stage.record([])   # recording resumes the clock first
    assert stage.paused is None and time.perf_counter() - stage.started < 0.2
