"""One bench cell and what its folder says about it: the matrix point, and done/failed/missing.

A cell's folder ``OUT/cells/<slug>`` is a normal run directory plus the bench's records:

* ``cell.json``: written once the cell has finished (its config, axis values, wall time, peak
  memory, launcher, job id, thread count, host);
* ``failed.json``: written when its process failed (reason, exit status, job id, log); a later
  success removes it;
* ``lease.json``, ``.heartbeat.json``, ``exit.json``: a submitted cell's lease, its process's
  heartbeat and exit record (:mod:`wsss_bench.launching`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .. import io
from ..launching import CELL_LOG, read_json

#: A cell whose process failed writes this file; a later success removes it.  ``cell.json`` is
#: written only for a finished cell; a rejected config writes nothing (it is never started).
FAILED = "failed.json"
DONE = "cell.json"


@dataclass
class Cell:
    """One point of the matrix."""

    values: dict[str, Any]
    config: dict[str, Any]
    #: Why the cell's config is rejected (it is then never started), else ``None``.
    error: Optional[str] = None

    @property
    def slug(self) -> str:
        """A readable, filesystem-safe id built from the axis values.

        A component given as a mapping (``{name: scorecam, options: {...}}``) shows its ``label``
        when it has one (a bench-only key, dropped from the config), else its name.
        """
        parts = []
        for key, value in self.values.items():
            words = key.split(".")
            title = words[-2] if words[-1] == "name" and len(words) > 1 else words[-1]
            if isinstance(value, dict) and ("label" in value or "name" in value):
                value = value.get("label", value.get("name"))
            parts.append(f"{title}-{value}")
        return re.sub(r"[^A-Za-z0-9_.=-]+", "_", "__".join(parts))[:180] or "cell"


def seed_of(cell: Cell) -> Any:
    """The cell's seed (cells of one seed share the seed's first stages)."""
    return cell.config.get("seed")


def next_startable(pending: list[Cell], running_seeds: set[Any], finished_seeds: set[Any]) -> Optional[int]:
    """Index of the first pending cell that may start now, or ``None``.

    Cells of one seed share that seed's stages (the baseline classifier, its features): the
    first to run computes them and puts them in the store.  So a cell waits while another cell
    of its seed runs, until one cell of that seed has finished; from then on the shared stages
    are in the store and cells of the seed may run side by side.  (Two cells that both need a
    stage the first did not compute would both compute it; the store's writes are atomic and
    the outputs equal, so the cost is time, never a wrong result.)

    The rule is the same whatever launches the cells: each cell is one job, submitted when
    this function lets it start (no job arrays or ``afterok`` chains).
    """
    for index, cell in enumerate(pending):
        seed = seed_of(cell)
        if seed not in running_seeds or seed in finished_seeds:
            return index
    return None


def finished_meta(cell_dir: Path, cell: Cell) -> Optional[dict[str, Any]]:
    """The ``cell.json`` of a cell that finished with exactly this config, else ``None``."""
    if not (cell_dir / "results.json").is_file():
        return None
    meta = read_json(cell_dir / DONE)
    return meta if meta is not None and meta.get("config") == cell.config else None


def record_failure(cell_dir: Path, cell: Cell, reason: str, returncode: Optional[int],
                   job: Optional[dict[str, Any]] = None, log: Optional[Path] = None) -> None:
    """Write ``failed.json``; ``job`` (launcher, job id) says which submission failed."""
    failure = {"config": cell.config, "values": cell.values, "returncode": returncode,
               "reason": reason, "log": str(log or cell_dir / CELL_LOG), **(job or {})}
    io.write_json(cell_dir / FAILED, failure)


def last_log_line(log_file: Path) -> str:
    """The last non-empty line of a log (``no output`` when there is none)."""
    try:
        lines = [line for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no output"
    return lines[-1].strip() if lines else "no output"


def cell_status(cell_dir: Path, cell: Cell) -> dict[str, Any]:
    """``{"status": done|failed|invalid|missing, ...}`` of one cell as its folder shows it.

    ``missing``: not run (yet), or interrupted.  A failure recorded for another config (the
    bench file changed since) counts as missing.  A failed cell's record names its job id.
    """
    if cell.error is not None:
        return {"status": "invalid", "reason": cell.error, "returncode": None, "log": None}
    if finished_meta(cell_dir, cell) is not None:
        return {"status": "done"}
    failure = read_json(cell_dir / FAILED)
    if failure is not None and failure.get("config") == cell.config:
        return {"status": "failed", "reason": failure.get("reason"), "returncode": failure.get("returncode"),
                "log": failure.get("log"), "job_id": failure.get("job_id"), "launcher": failure.get("launcher")}
    return {"status": "missing", "reason": "not run or interrupted", "returncode": None, "log": None}
