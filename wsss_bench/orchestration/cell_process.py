"""The process of one bench cell, wherever a launcher starts it: ``python -m`` this module.

``python -m wsss_bench.orchestration.cell_process --cell-dir D --store S --threads N -- run ...``

Around ``wsss run`` it

1. checks that the cell folder, its config and the store are visible here; a node that does not
   mount the bench folder ends the cell with one line on stderr (which the launcher's log keeps)
   and exit status 3, instead of a run that hangs or writes elsewhere;
2. sets the thread count before numpy or torch load (``default`` removes what a launcher put in
   the environment, e.g. Ray's ``OMP_NUM_THREADS``, so every launcher runs a cell alike);
3. appends its output to the cell's ``cell.log``;
4. keeps the cell's heartbeat (:data:`wsss_bench.launching.HEARTBEAT`) while the run lasts;
5. writes ``exit.json`` (exit status, wall time, the process's own peak resident memory).

Under ``torchrun`` (``RANK`` set) only rank 0 keeps the heartbeat and writes ``exit.json``; the
other ranks log to ``cell.rank<R>.log``.
"""
from __future__ import annotations

import argparse
import json
import os
import runpy
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional, Sequence

# Only the standard library and the torch-free launching module before the thread count is set.
from ..launching import CELL_CONFIG, CELL_LOG, EXIT, HEARTBEAT, heartbeat_seconds

#: Exit status of a cell that cannot see its folders.
NOT_VISIBLE = 3

_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _write_json_atomic(path: Path, obj: Any) -> None:
    # A unique temporary name per process: two processes (a stale cell and its successor) never
    # write into one temporary file.  (wsss_bench.io imports numpy, not loadable this early.)
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def visibility_problem(cell_dir: Path, store: Path) -> Optional[str]:
    """One line saying what this node cannot see, or ``None`` when it sees everything."""
    host = socket.gethostname()
    for path, what in ((cell_dir, "cell folder"), (cell_dir / CELL_CONFIG, "cell config"),
                       (store, "stage store")):
        if not path.exists():
            return (f"wsss bench cell: the {what} {path} does not exist on host {host}: the bench "
                    "folder and its store must be on a file system every node sees (README: "
                    "Benches on a cluster)")
    if not os.access(cell_dir, os.W_OK) or not os.access(store, os.W_OK):
        return f"wsss bench cell: {cell_dir} or {store} is not writable on host {host}"
    return None


def set_threads(threads: str) -> None:
    """``N``: every BLAS/OpenMP pool of the cell gets N threads; ``default``: the library default."""
    for var in _THREAD_VARS:
        if threads == "default":
            os.environ.pop(var, None)
        else:
            os.environ[var] = threads


class Heartbeat:
    """A daemon thread that rewrites the heartbeat file until :meth:`stop`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.every = heartbeat_seconds()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="wsss-heartbeat", daemon=True)
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "every": self.every,
                       "job_id": job_id_from_environment(), "started": time.time()}

    def beat(self) -> None:
        """Write the record with the current time (a failed write is tried again next beat)."""
        try:
            _write_json_atomic(self.path, {**self.record, "time": time.time()})
        except OSError:
            pass

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.beat()

    def start(self) -> "Heartbeat":
        """Beat once now, then every ``every`` seconds."""
        self.beat()
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop beating and remove the file (the cell is no longer live)."""
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.path.unlink()
        except OSError:
            pass


def job_id_from_environment() -> Optional[str]:
    """The scheduler's id of the job this process belongs to, where it sets one."""
    for var in ("SLURM_ARRAY_JOB_ID", "SLURM_JOB_ID", "SUBMITIT_LOCAL_JOB_ID", "WSSS_BENCH_JOB_ID"):
        if os.environ.get(var):
            return os.environ[var]
    return None


def peak_rss() -> tuple[float, str]:
    """This process's own peak resident memory in MiB and where the figure came from.

    ``VmHWM`` belongs to this address space.  Without ``/proc`` (macOS) ``ru_maxrss`` of this
    process (bytes there, KiB on Linux) is the fallback.
    """
    try:
        with open("/proc/self/status") as status:
            kb = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
        return float(kb) / 1024.0, "VmHWM"
    except (OSError, StopIteration, ValueError):
        import resource

        raw = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        return (raw / 2**20 if sys.platform == "darwin" else raw / 1024.0), "ru_maxrss"


def _redirect_output(log_file: Path) -> None:
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _terminated(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _run_wsss(args: Sequence[str]) -> int:
    """``wsss <args>`` in this process; its exit status."""
    sys.argv = ["wsss", *args]
    try:
        runpy.run_module("wsss_bench.cli.main", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)
        return 1
    except BaseException:  # an unexpected crash (or SIGTERM, see main) still gets its exit record
        import traceback

        traceback.print_exc()
        return 1
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one cell (see the module docstring); its exit status."""
    parser = argparse.ArgumentParser(prog="python -m " + __name__.rsplit(".", 1)[0] + ".cell_process")
    parser.add_argument("--cell-dir", type=Path, required=True)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--threads", default="default")
    parser.add_argument("run_args", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)
    run_args = ns.run_args[1:] if ns.run_args[:1] == ["--"] else ns.run_args
    if ns.threads != "default" and not (ns.threads.isdigit() and int(ns.threads) > 0):
        parser.error(f"--threads: a positive integer or 'default', got {ns.threads!r}")
    started = time.time()
    problem = visibility_problem(ns.cell_dir, ns.store)
    if problem is not None:
        print(problem, file=sys.stderr, flush=True)
        return NOT_VISIBLE
    set_threads(ns.threads)
    # A scheduler stops a job with SIGTERM (scancel, preemption, the bench cancelling it): as an
    # exception, so the run's own clean-up runs and the cell records how it ended.
    signal.signal(signal.SIGTERM, _terminated)
    # submitit asks SLURM for USR2 shortly before the time limit (a checkpoint cue for its own
    # workers); a cell resumes from its run folder instead, and USR2 would otherwise kill it
    # without an exit record.
    if hasattr(signal, "SIGUSR2"):
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    rank = int(os.environ.get("RANK", "0") or 0)
    _redirect_output(ns.cell_dir / (CELL_LOG if rank == 0 else f"cell.rank{rank}.log"))
    heartbeat = Heartbeat(ns.cell_dir / HEARTBEAT).start() if rank == 0 else None
    # One line per start of the cell in its log: which submission wrote what follows.
    print(f"== wsss bench cell: host {socket.gethostname()}, pid {os.getpid()}, job "
          f"{job_id_from_environment() or '-'}, threads {ns.threads}, rank {rank}, "
          f"{time.strftime('%Y-%m-%d %H:%M:%S')} ==", flush=True)
    code = _run_wsss(run_args)  # every way out of the run ends here (SystemExit included)
    if heartbeat is not None:
        peak_mb, source = peak_rss()
        _write_json_atomic(ns.cell_dir / EXIT, {
            "returncode": code, "seconds": time.time() - started, "peak_rss_mb": peak_mb,
            "peak_rss_source": source, "threads": ns.threads, "host": socket.gethostname(),
            "pid": os.getpid(), "job_id": heartbeat.record["job_id"],
            "processes": int(os.environ.get("WORLD_SIZE", "1") or 1)})
        heartbeat.stop()
    return code


if __name__ == "__main__":
    sys.exit(main())
