"""The ``ray`` launcher: each cell one Ray task that runs the cell's command.

``address`` joins a running cluster (``ray start --head`` on the nodes, or ``auto``); unset, a
local cluster is started for the bench and stopped with it.  Ray collects no usage statistics
here (``RAY_USAGE_STATS_ENABLED=0`` before Ray is imported) and starts no dashboard.  A task
reserves ``cpus_per_cell`` CPUs (default: the cell's thread count) and ``gpus_per_cell`` GPUs;
the cell process sets its own thread count, whatever Ray puts in the environment.

Ray tasks belong to their driver: if the bench process dies, Ray stops its tasks and a resumed
bench starts them again (from their run folders' checkpoints).  Results are read from the
cell's folder; the task returns only the command's exit status and the tail of its stderr.
Needs the ``ray`` extra: ``pip install 'wsss-bench[ray]'``.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field

from wsss_bench.errors import ConfigError
from wsss_bench.hookspecs import hookimpl
from wsss_bench.launching import ACTIVE, ENDED, UNKNOWN, CellJob, JobEnd, torchrun_command


class RayOptions(BaseModel):
    """Where the tasks run and what each reserves."""

    model_config = ConfigDict(extra="forbid")

    #: A running cluster (``auto``, ``ray://host:10001``, ``host:6379``); unset: a local one.
    address: Optional[str] = None
    #: CPUs of the local cluster (default: this machine's); ignored with ``address``.
    num_cpus: Optional[int] = Field(None, ge=1)
    #: CPUs reserved per cell, and its thread count (default: the local rule, cpu_count // --jobs).
    cpus_per_cell: Optional[int] = Field(None, ge=1)
    gpus_per_cell: float = Field(0, ge=0)
    #: Processes per cell under ``torchrun --standalone`` (on the one node the task runs on).
    procs_per_cell: int = Field(1, ge=1)
    #: Custom Ray resources per cell, e.g. ``{a100: 1}``.
    resources: dict[str, float] = Field(default_factory=dict)
    #: Bytes of the local cluster's object store (the tasks pass only an exit status).
    object_store_memory: int = Field(2**28, ge=78643200)


def import_ray() -> Any:
    """The ray module (usage statistics off), or a ConfigError naming the extra."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # read when ray is imported and when it starts
    try:
        import ray
    except ImportError:
        raise ConfigError("launcher 'ray' needs Ray: pip install 'wsss-bench[ray]'") from None
    return ray


def run_command(command: Sequence[str]) -> tuple[int, str]:
    """A task's body: run the cell's command with this worker's Python; (exit status, stderr tail)."""
    argv = list(command)
    if argv and argv[0] != sys.executable and Path(argv[0]).name.startswith("python"):
        argv[0] = sys.executable  # the worker's interpreter: the driver's path may not exist here
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tail = done.stderr.decode(errors="replace").strip().splitlines()
    return done.returncode, tail[-1] if tail else ""


class RayLauncher:
    """Cells as Ray tasks; job ids ``ray-<driver node>-<task>``."""

    #: A task is owned by its driver: Ray stops it when the bench process dies, so a resumed
    #: bench submits such cells again at once instead of waiting for their heartbeats to stop.
    jobs_outlive_driver = False

    def __init__(self, **options: Any) -> None:
        self.options = RayOptions(**options)
        self._refs: dict[str, Any] = {}
        self._ray: Any = None
        self._remote: Any = None
        self._started_cluster = False

    def cell_threads(self, default: Optional[int]) -> Optional[int]:
        """``cpus_per_cell`` when set, else the local rule's figure."""
        return self.options.cpus_per_cell or default

    def start(self, work_dir: Path) -> None:
        """Join ``address`` or start a local cluster (no dashboard, no usage statistics)."""
        ray = import_ray()
        o = self.options
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                  "configure_logging": False, "ignore_reinit_error": True}
        if o.address is None:
            kwargs.update(num_cpus=o.num_cpus or os.cpu_count() or 1, object_store_memory=o.object_store_memory)
        else:
            kwargs["address"] = o.address
        if not ray.is_initialized():
            try:
                ray.init(**kwargs)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise ConfigError(f"launcher 'ray': could not start or join a cluster: {exc}") from None
            self._started_cluster = True
        self._remote = ray.remote(run_command)
        self._ray = ray
        # Task ids repeat from one cluster start to the next (the first driver job is always
        # 1): the driver node's id makes the job ids recorded in leases and cell.json unique.
        self._session = ray.get_runtime_context().get_node_id()[:8]

    def submit(self, job: CellJob) -> str:
        """Start the cell's command as a task reserving its CPUs, GPUs and resources."""
        o = self.options
        ref = self._remote.options(num_cpus=(o.cpus_per_cell or job.threads or 1) * o.procs_per_cell, num_gpus=o.gpus_per_cell,
                                   resources=dict(o.resources) or None, max_retries=0,
                                   name=f"wsss-{job.name}"[:120]).remote(list(torchrun_command(job.command, o.procs_per_cell)))
        job_id = self._job_id(ref)
        self._refs[job_id] = ref
        return job_id

    def wait(self, job_ids: Sequence[str], timeout: float) -> list[JobEnd]:
        """The tasks among ``job_ids`` that ended within ``timeout`` seconds."""
        refs = [self._refs[j] for j in job_ids if j in self._refs]
        if not refs:
            return []
        ready, _ = self._ray.wait(refs, num_returns=1, timeout=max(0.0, timeout))
        if ready:  # every task that has ended by now, not only the first
            ready, _ = self._ray.wait(refs, num_returns=len(refs), timeout=0)
        ready_ids = {self._job_id(r) for r in ready}
        ended = []
        for job_id in [j for j in job_ids if j in ready_ids]:
            ref = self._refs.pop(job_id)
            try:
                code, said = self._ray.get(ref)
                ended.append(JobEnd(job_id, int(code), said or None))
            except Exception as exc:  # cancelled, or the worker died (a lost node)
                words = str(exc).strip().splitlines()
                ended.append(JobEnd(job_id, None, f"ray: {words[0] if words else type(exc).__name__}"))
        return ended

    def _job_id(self, ref: Any) -> str:
        return f"ray-{self._session}-{ref.task_id().hex()[:16]}"

    def state(self, job_id: str) -> str:
        """``active`` while one of this session's tasks runs; a task of an earlier driver is gone
        with it, so ``unknown``."""
        ref = self._refs.get(job_id)
        if ref is None:
            return UNKNOWN
        ready, _ = self._ray.wait([ref], timeout=0)
        return ENDED if ready else ACTIVE

    def cancel(self, job_id: str) -> None:
        """Interrupt the task (its command is killed with it)."""
        ref = self._refs.get(job_id)
        if ref is not None:
            try:
                self._ray.cancel(ref, force=True)  # a task blocked in its command ignores a soft cancel
            except Exception:  # already finished
                pass

    def close(self) -> None:
        """Leave the cluster (stopping the local one this launcher started)."""
        self._refs.clear()
        if self._ray is not None and self._started_cluster:
            self._ray.shutdown()
            self._started_cluster = False


@hookimpl
def register_launchers(register: Any) -> None:
    register("ray", RayLauncher, options=RayOptions,
             help="cells as Ray tasks on a local or running Ray cluster (extra [ray])")
