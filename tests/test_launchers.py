"""Bench launchers: the same tables through local processes, submitit and Ray; leases and resume.

submitit runs its real submission path through its LocalExecutor; Ray runs a real local cluster
(``num_cpus=2``).  A tiny bench (2 methods x 2 seeds) through each launcher must give a
``bench.json`` whose scores are bit-identical to the local launcher's.
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from conftest import write_voc_tree
from test_bench import bench_file
from wsss_bench import hookimpl, plugins
from wsss_bench.cli.main import cli
from wsss_bench.launching import EXIT, HEARTBEAT, LEASE, JobEnd, cell_command
from wsss_bench.orchestration import cell_process
from wsss_bench.orchestration.cells import Cell
from wsss_bench.orchestration.dispatch import Dispatcher, run_args

START_LINE = "== wsss bench cell:"
#: Columns that measure the machine, not the method (they differ run to run).
MACHINE_KEYS = ("seconds_mean", "peak_rss_mb_max")


def write_bench(folder: Path, matrix: str) -> Path:
    ids = [f"img_{i:03d}" for i in range(12)]
    root = write_voc_tree(folder / "voc", {"train_aug": ids[:8], "train": ids[:4], "val": ids[8:]})
    return bench_file(folder, root, matrix)  # test_bench's tiny bench: smoke preset, 1 epoch


TWO_BY_TWO = "  method: [{name: cam}, {name: subcat, options: {rounds: 1, k: 2}}]\n  seed: [0, 1]\n"


def scores(out: Path) -> str:
    """``bench.json`` without its time and memory columns, as canonical text."""
    found = json.loads((out / "bench.json").read_text())
    for row in found["rows"]:
        for key in MACHINE_KEYS:
            row.pop(key, None)
    return json.dumps(found, sort_keys=True)


def starts(cell_dir: Path) -> int:
    """How many times a cell's process started (one line each in its log)."""
    return (cell_dir / "cell.log").read_text(errors="replace").count(START_LINE)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny bench through the local launcher, two cells at a time: (bench file, its out)."""
    folder = tmp_path_factory.mktemp("launchers")
    path = write_bench(folder, TWO_BY_TWO)
    out = folder / "out-local"
    result = CliRunner().invoke(cli, ["bench", str(path), "--out", str(out), "--jobs", "2"])
    assert result.exit_code == 0, result.output
    return path, out


def run_through(path: Path, out: Path, launcher: str, *options: str) -> Any:
    args = ["bench", str(path), "--out", str(out), "--jobs", "2", "--launcher", launcher]
    for option in options:
        args += ["--launcher-opt", option]
    return CliRunner().invoke(cli, args)


def check_cells(out: Path, launcher: str) -> None:
    for meta_file in sorted((out / "cells").glob("*/cell.json")):
        meta = json.loads(meta_file.read_text())
        assert meta["launcher"] == launcher and meta["job_id"], meta
        assert meta["threads"] == max(1, (os.cpu_count() or 1) // 2)
        assert meta["peak_rss_source"] in ("VmHWM", "ru_maxrss") and meta["peak_rss_mb"] > 0
        assert starts(meta_file.parent) == 1
        assert not (meta_file.parent / LEASE).exists() and not (meta_file.parent / HEARTBEAT).exists()


@pytest.mark.parametrize("launcher, option, module", [("submitit", "executor=local", "submitit"),
                                                    ("ray", "num_cpus=2", "ray")])
def test_a_launcher_gives_the_local_tables(reference: tuple[Path, Path], tmp_path: Path,
                                           launcher: str, option: str, module: str) -> None:
    """submitit's local executor (its real submission path) and a local Ray cluster."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} (extra [{'slurm' if module == 'submitit' else 'ray'}]) not installed")
    path, local_out = reference
    out = tmp_path / f"out-{launcher}"
    result = run_through(path, out, launcher, option)
    assert result.exit_code == 0, result.output
    assert scores(out) == scores(local_out)
    check_cells(out, launcher)
    check_cells(local_out, "local")
    if launcher == "submitit":  # its own files (scripts, logs, pickles) kept apart from the cells'
        assert any((out / "launcher" / "submitit").iterdir())
    else:
        assert os.environ.get("RAY_USAGE_STATS_ENABLED") == "0"


@pytest.mark.skipif(importlib.util.find_spec("submitit") is None, reason="submitit (extra [slurm]) not installed")
def test_a_killed_driver_resumes_to_the_same_tables(reference: tuple[Path, Path], tmp_path: Path) -> None:
    """SIGKILL the bench while its first cells run; the jobs outlive it; the bench started again
    attaches to them (no cell runs twice) and ends with the tables of an uninterrupted bench."""
    path, local_out = reference
    out = tmp_path / "out-killed"
    args = [sys.executable, "-m", "wsss_bench.cli.main", "bench", str(path), "--out", str(out), "--jobs", "2",
            "--launcher", "submitit", "--launcher-opt", "executor=local"]
    driver = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(out.glob(f"cells/*/{HEARTBEAT}"))) < 2:
        time.sleep(0.1)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    running = sorted(p.parent.name for p in out.glob(f"cells/*/{HEARTBEAT}"))
    assert len(running) == 2, "the first two cells did not start"
    result = CliRunner().invoke(cli, args[3:])
    assert result.exit_code == 0, result.output
    attached = [line for line in result.output.splitlines() if "attached" in line or "no bench watched" in line]
    assert len(attached) == 2, result.output
    assert scores(out) == scores(local_out)
    for cell_dir in (out / "cells").iterdir():
        assert starts(cell_dir) == 1, f"{cell_dir.name} ran {starts(cell_dir)} times"


def test_a_cell_spans_two_processes_under_torchrun(tmp_path: Path) -> None:
    """``procs_per_cell: 2`` runs the cell under torchrun (gloo on CPU here, one process per GPU
    on a GPU node): one start line per rank, rank 0's exit record, a finished cell."""
    path = write_bench(tmp_path, "  seed: [0]\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["bench", str(path), "--out", str(out), "--launcher-opt", "procs_per_cell=2"])
    assert result.exit_code == 0, result.output
    cell_dir = out / "cells" / "seed-0"
    meta = json.loads((cell_dir / "cell.json").read_text())
    assert meta["processes"] == 2 and meta["launcher"] == "local"
    assert starts(cell_dir) == 1 and (cell_dir / "cell.rank1.log").read_text().count(START_LINE) == 1


# -- leases, without running cells --------------------------------------------------------------
class RecordingLauncher:
    """A launcher that runs nothing: it records what it is asked."""

    def __init__(self) -> None:
        self.submitted: list[str] = []
        self.states: dict[str, str] = {}

    def start(self, work_dir: Path) -> None:
        pass

    def submit(self, job: Any) -> str:
        self.submitted.append(job.name)
        return f"rec-{len(self.submitted)}"

    def wait(self, job_ids: Any, timeout: float) -> list[JobEnd]:
        return []

    def state(self, job_id: str) -> str:
        return self.states.get(job_id, "unknown")

    def cancel(self, job_id: str) -> None:
        pass

    def close(self) -> None:
        pass


def leased_cell(tmp_path: Path, heartbeat_age: float | None, submitted_ago: float = 3600,
                launcher: str = "rec") -> tuple[Dispatcher, Cell, Path, RecordingLauncher]:
    cell = Cell({"seed": 0}, {"seed": 0, "preset": "smoke"})
    out = tmp_path / "out"
    cell_dir = out / "cells" / cell.slug
    cell_dir.mkdir(parents=True)
    (cell_dir / "cell-config.yaml").write_text("seed: 0\npreset: smoke\n")
    (cell_dir / LEASE).write_text(json.dumps({"launcher": launcher, "job_id": "old-7",
                                              "submitted": time.time() - submitted_ago}))
    if heartbeat_age is not None:
        (cell_dir / HEARTBEAT).write_text(json.dumps({"host": "n1", "pid": 1, "every": 30,
                                                      "time": time.time() - heartbeat_age}))
    rec = RecordingLauncher()
    messages: list[str] = []
    return Dispatcher(out, out / "store", rec, "rec", 1, 1, messages.append, set()), cell, cell_dir, rec


def test_a_live_lease_is_attached_not_resubmitted(tmp_path: Path) -> None:
    dispatcher, cell, cell_dir, _ = leased_cell(tmp_path, heartbeat_age=3)
    dispatcher.adopt(1, cell)
    assert list(dispatcher.active) == ["old-7"] and dispatcher.active["old-7"].attached
    assert dispatcher.pending == [] and (cell_dir / LEASE).exists()


def test_a_lease_of_jobs_that_die_with_their_driver_expires_at_once(tmp_path: Path) -> None:
    dispatcher, cell, _, rec = leased_cell(tmp_path, heartbeat_age=3)
    rec.jobs_outlive_driver = False  # Ray: the earlier driver is gone, so are its tasks
    dispatcher.adopt(1, cell)
    assert dispatcher.active == {} and len(dispatcher.pending) == 1


def test_a_stale_lease_expires(tmp_path: Path) -> None:
    dispatcher, cell, cell_dir, _ = leased_cell(tmp_path, heartbeat_age=400)
    dispatcher.adopt(1, cell)
    assert dispatcher.active == {} and [c for _, c in dispatcher.pending] == [cell]
    assert not (cell_dir / LEASE).exists()


def test_a_lease_without_heartbeat_asks_the_launcher(tmp_path: Path) -> None:
    # Queued on the cluster for an hour: the launcher knows the job, so it stays attached.
    dispatcher, cell, _, rec = leased_cell(tmp_path / "a", heartbeat_age=None)
    rec.states["old-7"] = "active"
    dispatcher.adopt(1, cell)
    assert list(dispatcher.active) == ["old-7"]
    # Unknown to the launcher and submitted long ago: expired.
    dispatcher, cell, _, _ = leased_cell(tmp_path / "b", heartbeat_age=None)
    dispatcher.adopt(1, cell)
    assert dispatcher.active == {} and len(dispatcher.pending) == 1
    # Unknown but submitted a moment ago (still starting): trusted for the grace period.
    dispatcher, cell, _, _ = leased_cell(tmp_path / "c", heartbeat_age=None, submitted_ago=2, launcher="other")
    dispatcher.adopt(1, cell)
    assert list(dispatcher.active) == ["old-7"]


def test_a_cell_that_ended_unwatched_is_recorded(tmp_path: Path) -> None:
    dispatcher, cell, cell_dir, rec = leased_cell(tmp_path, heartbeat_age=None)
    (cell_dir / "results.json").write_text("{}")
    (cell_dir / EXIT).write_text(json.dumps({"returncode": 0, "seconds": 4.0, "peak_rss_mb": 100.0,
                                             "peak_rss_source": "VmHWM", "host": "n1"}))
    dispatcher.adopt(1, cell)
    dispatcher.run()
    meta = json.loads((cell_dir / "cell.json").read_text())
    assert meta["job_id"] == "old-7" and meta["launcher"] == "rec" and meta["seconds"] == 4.0
    assert rec.submitted == [] and not (cell_dir / LEASE).exists()


def test_a_lost_attached_cell_is_submitted_again(tmp_path: Path) -> None:
    dispatcher, cell, cell_dir, rec = leased_cell(tmp_path, heartbeat_age=3)
    dispatcher.adopt(1, cell)
    dispatcher.attach_poll_seconds = 0.0
    (cell_dir / HEARTBEAT).write_text(json.dumps({"time": time.time() - 400, "every": 30}))
    dispatcher._watch_attached()
    assert [c for _, c in dispatcher.pending] == [cell]


# -- a node that cannot see the bench folder ----------------------------------------------------
def test_a_cell_that_cannot_see_its_store_fails_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cell_dir = tmp_path / "cell"
    cell_dir.mkdir()
    (cell_dir / "cell-config.yaml").write_text("seed: 0\n")
    code = cell_process.main(["--cell-dir", str(cell_dir), "--store", str(tmp_path / "not-mounted"),
                              "--threads", "1", "--", "run"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == cell_process.NOT_VISIBLE and len(lines) == 1
    assert "stage store" in lines[0] and "every node sees" in lines[0]
    assert not (cell_dir / EXIT).exists()


class BlindNodeLauncher:
    """Runs each command as if on a node that does not mount the store (a wrong path)."""

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, work_dir: Path) -> None:
        pass

    def submit(self, job: Any) -> str:
        command = list(job.command)
        command[command.index("--store") + 1] = "/nonexistent/store"
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.procs[f"blind-{proc.pid}"] = proc
        return f"blind-{proc.pid}"

    def wait(self, job_ids: Any, timeout: float) -> list[JobEnd]:
        ends = []
        for job_id in job_ids:
            proc = self.procs[job_id]
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                continue
            ends.append(JobEnd(job_id, proc.returncode, proc.stderr.read().decode().strip() or None))
            proc.stderr.close()
        return ends

    def state(self, job_id: str) -> str:
        return "unknown"

    def cancel(self, job_id: str) -> None:
        self.procs[job_id].kill()

    def close(self) -> None:
        pass


class BlindNodePlugin:
    @hookimpl
    def register_launchers(self, register: Any) -> None:
        register("blind-node", BlindNodeLauncher, help="test: a node without the shared mount")


def test_a_store_the_cells_cannot_see_fails_them_with_one_line(tmp_path: Path) -> None:
    path = write_bench(tmp_path, "  seed: [0]\n")
    out = tmp_path / "out"
    plugins.register_plugin(BlindNodePlugin(), "blind_node_probe")
    try:
        result = CliRunner().invoke(cli, ["bench", str(path), "--out", str(out), "--launcher", "blind-node"])
    finally:
        plugins.unregister_plugin("blind_node_probe")
    assert result.exit_code != 0
    assert "1 of 1 bench cells failed" in result.output and "job blind-" in result.output
    failure = json.loads((out / "cells" / "seed-0" / "failed.json").read_text())
    assert failure["returncode"] == cell_process.NOT_VISIBLE and failure["job_id"].startswith("blind-")
    assert "/nonexistent/store" in failure["reason"] and "every node sees" in failure["reason"]
    assert "| blind-node blind-" in (out / "bench.md").read_text()


@pytest.mark.skipif(importlib.util.find_spec("submitit") is None, reason="submitit (extra [slurm]) not installed")
def test_submitit_options_become_sbatch_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from wsss_bench.errors import ConfigError
    from wsss_bench.plugins import registry

    options = {"executor": "slurm", "partition": "gpu", "account": "lab", "gpus_per_cell": 2, "cpus_per_cell": 8,
               "timeout_min": 600, "sbatch_options": {"qos": "high"}, "setup": ["source venv/bin/activate"]}
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="executor slurm"):  # no SLURM here: one clear message
        registry("launcher").create("submitit", **options).start(tmp_path / "a")
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", str(fake_bin))
    launcher = registry("launcher").create("submitit", **options)
    launcher.start(tmp_path / "b")
    assert launcher.cell_threads(1) == 8
    launcher._executor.update_parameters(name="wsss-cell", cpus_per_task=8)
    script = launcher._executor._executor._make_submission_file_text("CMD", "uid")
    for line in ("--partition=gpu", "--account=lab", "--gpus-per-node=2", "--cpus-per-task=8", "--time=600",
                 "--qos=high", "--job-name=wsss-cell"):
        assert f"#SBATCH {line}" in script, line
    assert "source venv/bin/activate" in script


# -- selection and errors -----------------------------------------------------------------------
@pytest.mark.parametrize("name, extra, module", [("submitit", "slurm", "submitit"), ("ray", "ray", "ray")])
def test_a_missing_launcher_library_names_its_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    name: str, extra: str, module: str) -> None:
    path = write_bench(tmp_path, "  seed: [0]\n")
    monkeypatch.setitem(sys.modules, module, None)  # import fails as when it is not installed
    result = CliRunner().invoke(cli, ["bench", str(path), "--out", str(tmp_path / "out"), "--launcher", name])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert f"pip install 'wsss-bench[{extra}]'" in result.output


def test_launcher_choice_and_bad_options(tmp_path: Path) -> None:
    from wsss_bench.errors import ConfigError
    from wsss_bench.orchestration.bench import resolve_launcher

    spec = {"launcher": {"name": "submitit", "options": {"partition": "gpu", "sbatch_options": {"qos": "low"}}}}
    assert resolve_launcher(spec) == ("submitit", spec["launcher"]["options"])
    assert resolve_launcher(spec, None, ["timeout_min=60", "sbatch_options.qos=high"]) == (
        "submitit", {"partition": "gpu", "timeout_min": 60, "sbatch_options": {"qos": "high"}})
    assert resolve_launcher(spec, "ray", ["num_cpus=2"]) == ("ray", {"num_cpus": 2})  # not submitit's
    assert resolve_launcher({}) == ("local", {})
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        resolve_launcher({}, None, ["novalue"])
    path = write_bench(tmp_path, "  seed: [0]\n")
    for args, message in ((["--launcher", "slurmm"], "unknown launcher 'slurmm'"),
                          (["--launcher-opt", "bogus=1"], "invalid options for launcher 'local'")):
        result = CliRunner().invoke(cli, ["bench", str(path), "--out", str(tmp_path / "o"), *args])
        assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("matrix: {seed: [0]}\nlauncher: submitit\n")
    result = CliRunner().invoke(cli, ["bench", str(bad), "--out", str(tmp_path / "o2")])
    assert result.exit_code != 0 and "'launcher' must be {name: NAME" in result.output


def test_the_cell_command_is_complete() -> None:
    cell_dir, store = Path("/shared/b/cells/c"), Path("/shared/b/store")
    command = cell_command(cell_dir, store, 4, run_args(cell_dir, store))
    assert command[:3] == (sys.executable, "-m", "wsss_bench.orchestration.cell_process")
    assert command[command.index("--threads") + 1] == "4"
    assert command[command.index("--") + 1:][:2] == ("run", "--config")
