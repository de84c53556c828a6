"""What a launcher plugin receives and reports: the bench's cells as commands, and their ends.

``wsss bench`` turns each cell of its matrix into a :class:`CellJob`: one command line that runs
the cell's ``wsss run`` in its own run folder (a normal run directory, the same whether the cell
runs as a local process, a SLURM job or a Ray task).  A launcher (the plugin kind registered
through ``register_launchers``; contract :class:`wsss_bench.contracts.Launcher`) only starts
such commands and says when they have ended.  Everything else is read from files the cell
writes into its folder, never from what a launcher returns:

* ``.heartbeat.json``: the cell process's host, pid, job id and a time, rewritten every
  :data:`HEARTBEAT_SECONDS` while it runs (the cell's half of its lease);
* ``exit.json``: its exit status, wall time and peak memory, written as the process ends;
* ``results.json``: the run's results, as for any run.

The bench writes the other half of the lease, ``lease.json`` (launcher, job id, the submitting
driver), when it submits the cell.  A cell whose lease is live is never submitted again; a
lease whose heartbeat has stopped expires (:func:`heartbeat_is_stale`).  All of this needs the
bench folder and its store on a file system every node sees.

This module imports neither torch nor any launcher library.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

#: Files of a cell folder (see the module docstring).
LEASE = "lease.json"
HEARTBEAT = ".heartbeat.json"
EXIT = "exit.json"
CELL_LOG = "cell.log"
CELL_CONFIG = "cell-config.yaml"

#: Seconds between two heartbeats of a running cell (``WSSS_BENCH_HEARTBEAT_S`` overrides it).
HEARTBEAT_SECONDS = 30.0

#: The module a cell's command runs (``python -m``): it checks the folders are visible, sets
#: the thread count, keeps the heartbeat and writes ``exit.json`` around ``wsss run``.
CELL_MODULE = "wsss_bench.orchestration.cell_process"

#: The states :meth:`Launcher.state` may report for a job id.
ACTIVE, ENDED, UNKNOWN = "active", "ended", "unknown"


@dataclass(frozen=True)
class CellJob:
    """One bench cell as a launcher submits it.

    ``command`` is complete: it needs no environment of its own (the thread count, the folders
    and the log file are arguments), so a launcher may run it anywhere the bench folder is
    mounted.  ``command[0]`` is the driver's Python interpreter; a launcher whose nodes have
    their own (Ray workers) may put theirs in its place.
    """

    #: The cell's folder name (its slug), unique within the bench.
    name: str
    command: tuple[str, ...]
    cell_dir: Path
    #: Threads the cell runs with (``None``: the machine's default), for resource requests.
    threads: Optional[int]
    #: Where the cell writes its output (the command redirects its own stdout and stderr).
    log_file: Path


@dataclass(frozen=True)
class JobEnd:
    """A submitted job that has ended, as the launcher saw it."""

    job_id: str
    #: The command's exit status where the launcher knows it (``None``: it does not, e.g. a
    #: job cancelled before it started).
    returncode: Optional[int] = None
    #: The launcher's words when the command could not run or was stopped (``None`` otherwise).
    reason: Optional[str] = None
    #: The launcher's own log of the job (e.g. submitit's stderr file), where it keeps one.
    log: Optional[str] = None


def cell_command(cell_dir: Path, store: Path, threads: Optional[int],
                 run_args: Sequence[str]) -> tuple[str, ...]:
    """The command line of one cell: :data:`CELL_MODULE` around ``wsss <run_args>``."""
    return (sys.executable, "-m", CELL_MODULE, "--cell-dir", str(cell_dir), "--store", str(store),
            "--threads", "default" if threads is None else str(int(threads)), "--", *run_args)


def torchrun_command(command: Sequence[str], procs: int) -> tuple[str, ...]:
    """A cell's command run as ``procs`` processes under ``torchrun --standalone`` (one machine,
    e.g. one process per GPU of the job); ``procs == 1`` leaves it as it is.

    Every process runs :data:`CELL_MODULE`; rank 0 alone keeps the heartbeat and writes
    ``exit.json``, and ``wsss run`` trains with DistributedDataParallel across them.
    """
    command = tuple(command)
    if procs <= 1:
        return command
    if command[1:3] != ("-m", CELL_MODULE):
        raise ValueError(f"not a cell command: {' '.join(command[:3])}")
    return (command[0], "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(int(procs)),
            *command[1:])


def heartbeat_seconds() -> float:
    """The heartbeat interval: ``WSSS_BENCH_HEARTBEAT_S`` or :data:`HEARTBEAT_SECONDS`."""
    try:
        value = float(os.environ.get("WSSS_BENCH_HEARTBEAT_S", HEARTBEAT_SECONDS))
    except ValueError:
        return HEARTBEAT_SECONDS
    return value if value > 0 else HEARTBEAT_SECONDS


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (also when another user owns it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def read_json(path: Path) -> Optional[dict[str, Any]]:
    """A JSON object from ``path``, or ``None`` when it is absent, partial or not an object."""
    try:
        found = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def stale_after(every: float) -> float:
    """Seconds after its last beat that a heartbeat of interval ``every`` counts as stopped:
    four intervals plus 5 s (a busy node may be late once or twice)."""
    return 4 * every + 5


def poll_ends(job_ids: Sequence[str], ended: Callable[[str], Optional[JobEnd]], timeout: float,
              every: float) -> list[JobEnd]:
    """A launcher's ``wait`` by polling: ``ended(job_id)`` gives a job's :class:`JobEnd` once it
    has ended (else ``None``); looks every ``every`` seconds until one has or ``timeout`` passed."""
    deadline = time.monotonic() + max(0.0, timeout)
    while True:
        found = [end for end in map(ended, job_ids) if end is not None]
        if found or time.monotonic() >= deadline:
            return found
        time.sleep(min(every, max(0.01, deadline - time.monotonic())))


def heartbeat_is_stale(heartbeat: Optional[dict[str, Any]], now: Optional[float] = None) -> bool:
    """Whether a heartbeat record is too old to belong to a live cell.

    Stale :func:`stale_after` its own interval.  The record's time is the cell node's clock, compared with this one: nodes' clocks must
    agree to well within that margin (NTP does).
    """
    if not heartbeat or not isinstance(heartbeat.get("time"), (int, float)):
        return True
    every = heartbeat.get("every")
    every = float(every) if isinstance(every, (int, float)) and every > 0 else HEARTBEAT_SECONDS
    return (time.time() if now is None else now) - float(heartbeat["time"]) > stale_after(every)


__all__ = ["ACTIVE", "CELL_CONFIG", "CELL_LOG", "CELL_MODULE", "CellJob", "ENDED", "EXIT", "HEARTBEAT",
           "HEARTBEAT_SECONDS", "JobEnd", "LEASE", "UNKNOWN", "cell_command", "heartbeat_is_stale",
           "heartbeat_seconds", "pid_alive", "poll_ends", "read_json", "stale_after", "torchrun_command"]
