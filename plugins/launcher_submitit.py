"""The ``submitit`` launcher: each cell one SLURM job, submitted through submitit.

Each cell is submitted as the command a local cell runs (``submitit.helpers.CommandFunction``),
one job per cell, as the bench's scheduling rule lets it start (no job arrays, no ``afterok``
chains: the driver submits a seed's later cells when its first one has finished, so it must
stay alive while the bench has cells to start).  submitit's own files (its sbatch scripts,
logs and pickles) go to ``OUT/launcher/submitit/<job id>/``; results are read from the cell's
folder, never from submitit's result pickle.

``executor: auto`` uses SLURM when ``sbatch`` is on PATH, else submitit's ``LocalExecutor``
(real subprocesses on this machine, the same submission path; what the tests use).
Needs the ``slurm`` extra: ``pip install 'wsss-bench[slurm]'``.
"""
from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field

from wsss_bench.errors import ConfigError
from wsss_bench.hookspecs import hookimpl
from wsss_bench.launching import ACTIVE, ENDED, UNKNOWN, CellJob, JobEnd, pid_alive, poll_ends, torchrun_command

#: SLURM states of a job that is still queued or running.
_SLURM_ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING",
                 "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD"}


class SubmititOptions(BaseModel):
    """Resources of one cell's job."""

    model_config = ConfigDict(extra="forbid")

    executor: Literal["auto", "slurm", "local"] = "auto"
    partition: Optional[str] = None
    account: Optional[str] = None
    gpus_per_cell: int = Field(0, ge=0)
    #: Processes per cell under ``torchrun --standalone`` (e.g. one per GPU: ``gpus_per_cell``).
    procs_per_cell: int = Field(1, ge=1)
    #: CPUs reserved per cell, and the cell's thread count (default: the local rule,
    #: cpu_count // --jobs of the submitting machine, or 1 CPU when that is the library default).
    cpus_per_cell: Optional[int] = Field(None, ge=1)
    mem_gb: Optional[float] = Field(None, gt=0)
    #: The job's time limit.  (submitit's local executor would default to 2 minutes.)
    timeout_min: int = Field(24 * 60, ge=1)
    #: Extra ``#SBATCH`` options, e.g. ``{qos: high, constraint: a100}``.
    sbatch_options: dict[str, Any] = Field(default_factory=dict)
    #: Shell lines run in the job before the cell, e.g. ``["source ~/venv/bin/activate"]``.
    setup: list[str] = Field(default_factory=list)
    #: Seconds between two looks at the jobs' states.
    poll_seconds: float = Field(2.0, gt=0)


def import_submitit() -> Any:
    """The submitit module, or a ConfigError naming the extra that installs it."""
    try:
        import submitit
    except ImportError:
        raise ConfigError("launcher 'submitit' needs submitit: pip install 'wsss-bench[slurm]'") from None
    return submitit


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid``, parents before children (Linux ``/proc``; else none)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid ...": the command may hold spaces and parentheses.
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    found, queue = [], list(children.get(pid, []))
    while queue:
        child = queue.pop(0)
        found.append(child)
        queue.extend(children.get(child, []))
    return found


class SubmititLauncher:
    """Cells as submitit jobs (SLURM, or submitit's local executor)."""

    def __init__(self, **options: Any) -> None:
        self.options = SubmititOptions(**options)
        self._jobs: dict[str, Any] = {}
        self._executor: Any = None
        self.folder: Optional[Path] = None
        self.cluster: Optional[str] = None

    def cell_threads(self, default: Optional[int]) -> Optional[int]:
        """``cpus_per_cell`` when set, else the local rule's figure."""
        return self.options.cpus_per_cell or default

    def start(self, work_dir: Path) -> None:
        """Create the executor; its files go under ``work_dir``."""
        submitit = import_submitit()
        chosen = self.options.executor
        if chosen == "auto":
            chosen = "slurm" if shutil.which("sbatch") else "local"
        self.cluster = chosen
        self.folder = Path(work_dir).resolve()
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            self._executor = submitit.AutoExecutor(folder=self.folder / "%j", cluster=chosen)
        except RuntimeError as exc:  # executor: slurm where SLURM's commands are missing
            raise ConfigError(f"launcher 'submitit', executor {chosen}: {exc} (executor: local runs the "
                              "cells on this machine)") from None
        o = self.options
        params: dict[str, Any] = {"timeout_min": o.timeout_min, "gpus_per_node": o.gpus_per_cell,
                                  "tasks_per_node": 1, "nodes": 1}
        if o.mem_gb is not None:
            params["mem_gb"] = o.mem_gb
        if chosen == "slurm":
            params.update(slurm_partition=o.partition, slurm_account=o.account,
                          slurm_additional_parameters=dict(o.sbatch_options) or None,
                          slurm_setup=list(o.setup) or None)
        elif o.setup:
            params["local_setup"] = list(o.setup)
        try:
            self._executor.update_parameters(**params)
        except (NameError, ValueError, AssertionError) as exc:
            raise ConfigError(f"launcher 'submitit': {exc}") from None

    def submit(self, job: CellJob) -> str:
        """Submit the cell's command as one job named ``wsss-<cell>``."""
        submitit = import_submitit()
        cpus = (self.options.cpus_per_cell or job.threads or 1) * self.options.procs_per_cell
        self._executor.update_parameters(name=f"wsss-{job.name}"[:120], cpus_per_task=cpus)
        try:
            submitted = self._executor.submit(submitit.helpers.CommandFunction(
                list(torchrun_command(job.command, self.options.procs_per_cell)), verbose=False))
        except Exception as exc:  # sbatch refused it (bad partition, account, ...): say so, once
            raise ConfigError(f"launcher 'submitit': the job of cell {job.name} was not accepted: "
                              f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else exc!r}") from None
        self._jobs[str(submitted.job_id)] = submitted
        return str(submitted.job_id)

    def _end(self, job_id: str, submitted: Any) -> JobEnd:
        stderr = Path(submitted.paths.stderr)
        try:
            lines = [line for line in stderr.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            lines = []
        # submitit reports a failed command as a traceback ending in the command's own stderr.
        reason = lines[-1].strip() if lines else None
        return JobEnd(job_id, None, reason, str(stderr))

    def _ended(self, job_id: str) -> Optional[JobEnd]:
        submitted = self._jobs.get(job_id)
        if submitted is None or not submitted.done():
            return None
        del self._jobs[job_id]
        return self._end(job_id, submitted)

    def wait(self, job_ids: Sequence[str], timeout: float) -> list[JobEnd]:
        """The jobs among ``job_ids`` that ended within ``timeout`` seconds."""
        return poll_ends(job_ids, self._ended, timeout, self.options.poll_seconds)

    def state(self, job_id: str) -> str:
        """A job's state, also one submitted by an earlier bench process (SLURM: ``sacct``)."""
        submitted = self._jobs.get(job_id)
        if submitted is not None:
            return ENDED if submitted.done() else ACTIVE
        if self.folder is None or not (self.folder / job_id).is_dir():
            return UNKNOWN  # not a job of this bench's submitit folder
        if self.cluster == "slurm":
            submitit = import_submitit()
            found = str(submitit.SlurmJob(folder=self.folder / "%j", job_id=job_id).state).upper()
            if found.startswith("UNKNOWN"):
                return UNKNOWN
            return ACTIVE if found.split()[0] in _SLURM_ACTIVE else ENDED
        # The local executor's job id is its controller's pid on this machine.
        return ACTIVE if job_id.isdigit() and pid_alive(int(job_id)) else ENDED

    def cancel(self, job_id: str) -> None:
        """``scancel`` (or the local executor's interrupt) of a job this launcher submitted.

        SLURM stops the job's whole process tree; submitit's local executor only interrupts its
        own processes, which would leave the cell's command running, so that is sent SIGTERM
        first (the cell then records how it ended).
        """
        submitted = self._jobs.get(job_id)
        if submitted is None:
            return
        if self.cluster == "local" and job_id.isdigit():
            for pid in reversed(_descendants(int(job_id))):
                try:
                    os.kill(pid, signal.SIGTERM)
                except OSError:
                    pass
        submitted.cancel(check=False)

    def close(self) -> None:
        """Forget the jobs (running ones keep running: SLURM jobs outlive their driver)."""
        self._jobs.clear()


@hookimpl
def register_launchers(register: Any) -> None:
    register("submitit", SubmititLauncher, options=SubmititOptions,
             help="cells as SLURM jobs through submitit (executor: auto|slurm|local; extra [slurm])")
