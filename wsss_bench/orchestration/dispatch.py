"""The bench driver's cell loop: submit cells through a launcher, watch them, record how they end.

The loop is launcher-independent.  It submits a cell when :func:`~.cells.next_startable` lets
it start and a slot (``--jobs``) is free, then learns that a job ended from the launcher and
what came of it from the cell's folder (``exit.json``, ``results.json``), never from the
launcher.  Each submitted cell holds a lease (``lease.json``: launcher, job id, the submitting
driver); its process keeps a heartbeat.  A bench started again on the same folder (the driver
died, was killed, or the node went down) therefore

* finalises cells that ended while no driver watched (their ``exit.json`` is there);
* attaches to cells that are still live (a fresh heartbeat, or a job the launcher reports
  queued or running) and waits for them, never submitting them twice;
* submits again the cells whose lease has expired: a stopped heartbeat without an exit record,
  or no heartbeat at all long after the submission while the launcher knows nothing of the job.
  The cell's ``wsss run --resume`` continues from its last checkpoint.
"""
from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from .. import contracts, io
from ..launching import (ACTIVE, CELL_CONFIG, CELL_LOG, ENDED, EXIT, HEARTBEAT, LEASE, CellJob, JobEnd,
                         cell_command, heartbeat_is_stale, heartbeat_seconds, read_json, stale_after)
from . import runlock
from .cells import DONE, FAILED, Cell, last_log_line, next_startable, record_failure, seed_of


def lease_grace_seconds() -> float:
    """Seconds a lease without any heartbeat stays live when its launcher cannot say whether the
    job exists (a job still starting on a busy node): the heartbeat's own staleness margin."""
    return stale_after(heartbeat_seconds())


@dataclass
class Active:
    """A cell that is submitted (by this driver) or attached to (submitted by an earlier one)."""

    number: int
    cell: Cell
    cell_dir: Path
    job_id: str
    launcher: str
    attached: bool
    submitted: float
    threads: Optional[int]


def cell_threads(jobs: int, launcher: Any) -> Optional[int]:
    """The thread count of every cell: ``cpu_count // jobs`` when cells run side by side, else
    the driver's ``OMP_NUM_THREADS`` (or the library default); a launcher that reserves CPUs per
    cell (``cell_threads``) may put its own figure in place."""
    if jobs > 1:
        default: Optional[int] = max(1, (os.cpu_count() or 1) // jobs)
    else:
        inherited = os.environ.get("OMP_NUM_THREADS", "")
        default = int(inherited) if inherited.isdigit() and int(inherited) > 0 else None
    own = getattr(launcher, "cell_threads", None)
    return own(default) if callable(own) else default


def run_args(cell_dir: Path, store: Path) -> list[str]:
    """The ``wsss`` arguments of a cell's run."""
    return ["run", "--config", str(cell_dir / CELL_CONFIG), "--out", str(cell_dir), "--resume",
            "--cache-dir", str(store), "--quiet"]


def _read_config(cell_dir: Path) -> Any:
    try:
        return yaml.safe_load((cell_dir / CELL_CONFIG).read_text())
    except (OSError, yaml.YAMLError):
        return None


class Dispatcher:
    """Runs the pending cells of one bench through one launcher (see the module docstring)."""

    #: Seconds between two looks at the cells this driver only attached to.
    attach_poll_seconds = 1.0

    def __init__(self, out: Path, store: Path, launcher: Any, launcher_name: str, jobs: int,
                 total: int, echo: Callable[[str], Any], finished_seeds: set[Any]) -> None:
        self.out = Path(out).resolve()
        self.store = Path(store).resolve()
        self.launcher = launcher
        self.name = launcher_name
        self.jobs = jobs
        self.total = total
        self.echo = echo
        self.finished_seeds = finished_seeds
        self.threads = cell_threads(jobs, launcher)
        self.active: dict[str, Active] = {}
        self.pending: list[tuple[int, Cell]] = []
        #: Times this driver has put a cell (by slug) back in the queue after losing it.
        self.requeued: dict[str, int] = {}

    # -- resume -----------------------------------------------------------------------------
    def adopt(self, number: int, cell: Cell) -> None:
        """Queue a cell that has not finished, or take over its live or ended submission."""
        cell_dir = self.out / "cells" / cell.slug
        lease = read_json(cell_dir / LEASE)
        if lease is None:
            self.pending.append((number, cell))
            return
        job_id, launcher = str(lease.get("job_id")), str(lease.get("launcher"))
        slot = Active(number, cell, cell_dir, job_id, launcher, True, float(lease.get("submitted") or 0),
                      lease.get("threads"))
        if (cell_dir / EXIT).is_file():
            if self._finish(slot, None, retry_failures=True) == "done":
                self.echo(f"[{number}/{self.total}] {cell.slug}: finished while no bench watched "
                          f"({launcher} job {job_id}), recorded")
            else:
                self.pending.append((number, cell))
            return
        state = self._liveness(slot)
        if state == ACTIVE:
            self.echo(f"[{number}/{self.total}] {cell.slug}: still running as {launcher} job {job_id}, "
                      "attached (not submitted again)")
            self.active[job_id] = slot
        else:
            self.echo(f"[{number}/{self.total}] {cell.slug}: the lease of {launcher} job {job_id} has "
                      f"expired ({state}); submitted again, resuming its run")
            self._drop_lease(cell_dir)
            self.pending.append((number, cell))

    def _liveness(self, slot: Active) -> str:
        """``active`` when the cell's submission is live, else why its lease has expired."""
        if slot.attached and slot.launcher == self.name \
                and getattr(self.launcher, "jobs_outlive_driver", True) is False:
            # The bench folder's lock says the driver that submitted it has ended, and this
            # launcher's jobs end with their driver (Ray's tasks): nothing to wait for.
            return f"{self.name} jobs end with the bench process that submitted them"
        heartbeat = read_json(slot.cell_dir / HEARTBEAT)
        if heartbeat is not None:
            return ACTIVE if not heartbeat_is_stale(heartbeat) else "its heartbeat stopped"
        state = self.launcher.state(slot.job_id) if slot.launcher == self.name else "unknown"
        if state == ACTIVE:
            return ACTIVE  # queued, or starting
        if state == ENDED:
            return "the job ended without an exit record"
        if time.time() - slot.submitted < lease_grace_seconds():
            return ACTIVE
        return "no heartbeat and the launcher does not know the job"

    # -- submission -------------------------------------------------------------------------
    def _submit(self, number: int, cell: Cell) -> None:
        cell_dir = self.out / "cells" / cell.slug
        runlock.mark_run_folder(cell_dir)  # the cell's `wsss run --resume` writes here
        for name in (EXIT, HEARTBEAT):  # what they say belongs to the previous submission
            (cell_dir / name).unlink(missing_ok=True)
        io.write_yaml(cell_dir / CELL_CONFIG, cell.config)
        command = cell_command(cell_dir, self.store, self.threads, run_args(cell_dir, self.store))
        job = CellJob(cell.slug, command, cell_dir, self.threads, cell_dir / CELL_LOG)
        lease = {"launcher": self.name, "job_id": None, "submitted": time.time(), "threads": self.threads,
                 "driver_host": socket.gethostname(), "driver_pid": os.getpid(), "command": list(command)}
        # Leased before the submission, so a driver killed between the two leaves a lease that
        # a resumed bench honours (for the grace period, or while the heartbeat is fresh).
        io.write_json(cell_dir / LEASE, lease)
        try:
            job_id = contracts.check_job_id(self.launcher, self.launcher.submit(job))
        except BaseException:
            self._drop_lease(cell_dir)
            raise
        now = time.time()
        io.write_json(cell_dir / LEASE, {**lease, "job_id": job_id, "submitted": now})
        self.active[job_id] = Active(number, cell, cell_dir, job_id, self.name, False, now, self.threads)
        shown = "" if self.name == "local" else f" ({self.name} job {job_id})"
        self.echo(f"[{number}/{self.total}] {cell.slug}{shown}")

    def _fill_slots(self) -> None:
        while self.pending and len(self.active) < self.jobs:
            busy = {seed_of(a.cell) for a in self.active.values()}
            pick = next_startable([c for _, c in self.pending], busy, self.finished_seeds)
            if pick is None:
                return
            self._submit(*self.pending.pop(pick))

    # -- ends -------------------------------------------------------------------------------
    @staticmethod
    def _drop_lease(cell_dir: Path) -> None:
        (cell_dir / LEASE).unlink(missing_ok=True)

    def _finish(self, slot: Active, end: Optional[JobEnd], retry_failures: bool = False) -> str:
        """Record how a cell ended: ``done`` (``cell.json``), ``failed`` (``failed.json``) or
        ``foreign`` (the submission ran another config: the bench file changed meanwhile).

        ``retry_failures``: a failure found on resume is not recorded (the cell is run again).
        """
        cell, cell_dir = slot.cell, slot.cell_dir
        self._drop_lease(cell_dir)  # ended, whichever way: the submission no longer holds the cell
        exit_record = read_json(cell_dir / EXIT) or {}
        returncode = exit_record.get("returncode", end.returncode if end is not None else None)
        job = {"launcher": slot.launcher, "job_id": slot.job_id}
        if _read_config(cell_dir) != cell.config:
            return "foreign"
        if exit_record and returncode == 0 and (cell_dir / "results.json").is_file():
            io.write_json(cell_dir / DONE, {
                "config": cell.config, "values": cell.values, "returncode": 0,
                "seconds": exit_record.get("seconds"), "peak_rss_mb": exit_record.get("peak_rss_mb"),
                "peak_rss_source": exit_record.get("peak_rss_source"), **job,
                "threads": slot.threads, "processes": exit_record.get("processes", 1),
                "host": exit_record.get("host")})
            (cell_dir / FAILED).unlink(missing_ok=True)
            self.finished_seeds.add(seed_of(cell))
            return "done"
        if retry_failures:
            return "failed"
        if exit_record:
            reason, log = last_log_line(cell_dir / CELL_LOG), cell_dir / CELL_LOG
        else:  # the cell process never got to its log: the launcher's words and log
            reason = (end.reason if end is not None and end.reason else None) or last_log_line(cell_dir / CELL_LOG)
            log = Path(end.log) if end is not None and end.log else cell_dir / CELL_LOG
        record_failure(cell_dir, cell, reason, returncode, job, log)
        self.echo(f"  {cell.slug} failed (exit {returncode}, {slot.launcher} job {slot.job_id}): {reason}; "
                  f"see {log}")
        return "failed"

    def _lost(self, slot: Active, why: str) -> None:
        """A cell whose submission vanished: back in the queue once, then a failure."""
        self._drop_lease(slot.cell_dir)
        if self.requeued.get(slot.cell.slug, 0) >= 1:
            record_failure(slot.cell_dir, slot.cell, f"lost twice: {why}", None,
                           {"launcher": slot.launcher, "job_id": slot.job_id})
            self.echo(f"  {slot.cell.slug} lost again ({why}); recorded as failed")
            return
        self.echo(f"  {slot.cell.slug}: {slot.launcher} job {slot.job_id} lost ({why}); submitted again")
        self.pending.insert(0, (slot.number, slot.cell))
        self.requeued[slot.cell.slug] = self.requeued.get(slot.cell.slug, 0) + 1

    def _watch_attached(self) -> None:
        for job_id, slot in list(self.active.items()):
            if not slot.attached:
                continue
            if (slot.cell_dir / EXIT).is_file():
                del self.active[job_id]
                if self._finish(slot, None) == "foreign":
                    self.pending.append((slot.number, slot.cell))  # another config ran: run ours
                continue
            state = self._liveness(slot)
            if state != ACTIVE:
                del self.active[job_id]
                self._lost(slot, state)

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> None:
        """Run until every pending and attached cell has ended; on an interrupt, cancel the jobs
        this driver submitted (attached ones are left running)."""
        try:
            while True:
                self._fill_slots()
                if not self.active:
                    break
                own = [j for j, a in self.active.items() if not a.attached]
                timeout = self.attach_poll_seconds if len(own) < len(self.active) else 5.0
                if own:
                    ends = contracts.check_job_ends(self.launcher, self.launcher.wait(own, timeout), own)
                else:
                    time.sleep(timeout)
                    ends = []
                for end in ends:
                    slot = self.active.pop(end.job_id)
                    # Killed without a word (SIGKILL, a lost node): its heartbeat is left behind.
                    if not (slot.cell_dir / EXIT).is_file() and end.returncode is None \
                            and read_json(slot.cell_dir / HEARTBEAT) is not None:
                        self._lost(slot, end.reason or "the job ended without an exit record")
                        continue
                    self._finish(slot, end)  # never "foreign": this driver wrote the cell's config
                self._watch_attached()
        except BaseException:
            for job_id, slot in self.active.items():  # Ctrl-C or a crash: stop what we started
                if not slot.attached:
                    try:
                        self.launcher.cancel(job_id)
                    except Exception as exc:  # noqa: BLE001 - the interrupt is what matters
                        print(f"could not cancel {self.name} job {job_id}: {exc}", file=sys.stderr)
                    self._drop_lease(slot.cell_dir)
            raise
