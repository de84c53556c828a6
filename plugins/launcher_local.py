"""The ``local`` launcher: each cell a child process of the bench, ``--jobs N`` at a time.

The default.  A cell's process writes its own log, heartbeat and exit record into its folder
(:mod:`wsss_bench.orchestration.cell_process`), so it outlives a bench killed under it and a
resumed bench attaches to it instead of starting it again.
"""
from __future__ import annotations

import socket
import subprocess
from pathlib import Path
from typing import Any, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field

from wsss_bench.hookspecs import hookimpl
from wsss_bench.launching import ACTIVE, ENDED, UNKNOWN, CellJob, JobEnd, pid_alive, poll_ends, torchrun_command


class LocalOptions(BaseModel):
    """``--jobs N`` sets how many cells run at once; ``procs_per_cell`` > 1 runs each cell
    under ``torchrun`` (e.g. one process per GPU of this machine)."""

    model_config = ConfigDict(extra="forbid")

    procs_per_cell: int = Field(1, ge=1)


class LocalLauncher:
    """Cells as child processes of this one; job ids ``local-<host>-<pid>``."""

    #: Seconds between two looks at the children while waiting.
    poll_seconds = 0.2

    def __init__(self, procs_per_cell: int = 1) -> None:
        self.procs_per_cell = procs_per_cell
        self._procs: dict[str, subprocess.Popen] = {}
        self._host = socket.gethostname()

    def start(self, work_dir: Path) -> None:
        """Nothing to prepare."""

    def submit(self, job: CellJob) -> str:
        """Start the cell's command; it writes its own log (stdout and stderr are not kept)."""
        proc = subprocess.Popen(list(torchrun_command(job.command, self.procs_per_cell)), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        job_id = f"local-{self._host}-{proc.pid}"
        self._procs[job_id] = proc
        return job_id

    def _ended(self, job_id: str) -> Optional[JobEnd]:
        proc = self._procs.get(job_id)
        if proc is None or proc.poll() is None:
            return None
        # Before the cell's log is open (a folder it cannot see) it writes to stderr.
        said = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
        del self._procs[job_id]
        return JobEnd(job_id, proc.returncode, said.splitlines()[-1] if said else None)

    def wait(self, job_ids: Sequence[str], timeout: float) -> list[JobEnd]:
        """The jobs among ``job_ids`` that ended within ``timeout`` seconds."""
        return poll_ends(job_ids, self._ended, timeout, self.poll_seconds)

    def state(self, job_id: str) -> str:
        """``active`` while the process runs (also one started by an earlier bench on this host)."""
        if job_id in self._procs:
            return ACTIVE if self._procs[job_id].poll() is None else ENDED
        prefix, _, pid = job_id.rpartition("-")
        if prefix != f"local-{self._host}" or not pid.isdigit():
            return UNKNOWN  # another host's, or not ours
        return ACTIVE if pid_alive(int(pid)) else ENDED

    def cancel(self, job_id: str) -> None:
        """SIGTERM (the cell records how it ended), then SIGKILL after 30 s."""
        proc: Optional[subprocess.Popen] = self._procs.get(job_id)
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        """Forget the children (those still running keep running)."""
        for proc in self._procs.values():
            if proc.stderr:
                proc.stderr.close()
        self._procs.clear()


@hookimpl
def register_launchers(register: Any) -> None:
    register("local", LocalLauncher, options=LocalOptions,
             help="cells as processes on this machine, --jobs N at a time (the default)")
