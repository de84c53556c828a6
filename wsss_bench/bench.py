"""``wsss bench``: a matrix of runs (methods x backbones x clusterers x K x seeds), aggregated.

A bench file::

    name: clusterers
    preset: default                 # the preset every cell starts from
    base: {method: {name: subcat}}  # config layered over it (like --config)
    matrix:                         # dotted config keys -> values; the cells are the product
      method.options.clusterer.name: [kmeans, gmm]
      seed: [0, 1, 2]
    labels: {method.options.clusterer.name: clusterer}   # optional column titles

Each cell is a normal run directory ``OUT/cells/<cell>``, run in its own process (so its peak
memory is its own and a crash cannot take the bench down).  All cells share one
content-addressed store ``OUT/store``: a classifier, a feature set or a CAM folder whose inputs
were computed by an earlier cell is linked, not recomputed.  A finished cell is skipped on
re-runs; an interrupted one resumes.
"""
from __future__ import annotations

import csv
import io as _io
import itertools
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from . import io
from .config import deep_merge, load_config, parse_override, read_yaml_file
from .errors import ConfigError, UserError
from .runner import validate_plugins
from .evaluation.tables import markdown_table, pct

BENCH_KEYS = {"name", "preset", "base", "matrix", "labels", "description"}


@dataclass
class Cell:
    """One point of the matrix."""

    values: dict[str, Any]
    config: dict[str, Any]

    @property
    def slug(self) -> str:
        """A readable, filesystem-safe id built from the axis values.

        A component given as a mapping (``{name: scorecam, options: {...}}``) shows its name.
        """
        parts = []
        for key, value in self.values.items():
            words = key.split(".")
            title = words[-2] if words[-1] == "name" and len(words) > 1 else words[-1]
            if isinstance(value, dict) and "name" in value:
                value = value["name"]
            parts.append(f"{title}-{value}")
        return re.sub(r"[^A-Za-z0-9_.=-]+", "_", "__".join(parts))[:180] or "cell"


def load_bench(path: Path) -> dict[str, Any]:
    """Read and check a bench file."""
    spec = read_yaml_file(Path(path))
    unknown = set(spec) - BENCH_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown bench keys {sorted(unknown)}; allowed: {sorted(BENCH_KEYS)}")
    matrix = spec.get("matrix") or {}
    if not isinstance(matrix, dict) or not all(isinstance(v, list) and v for v in matrix.values()):
        raise ConfigError(f"{path}: 'matrix' must map config keys to non-empty lists of values")
    spec.setdefault("name", Path(path).stem)
    return spec


def expand(spec: dict[str, Any]) -> list[Cell]:
    """Every combination of the matrix values, each validated as a full config."""
    matrix = spec.get("matrix") or {}
    keys = list(matrix)
    cells = []
    for combo in itertools.product(*(matrix[k] for k in keys)):
        values = dict(zip(keys, combo))
        layer = spec.get("base") or {}
        for key, value in values.items():
            layer = deep_merge(layer, parse_override(f"{key}={json.dumps(value)}"))
        config = load_config(spec.get("preset"), None, [layer])  # validates now, not mid-bench
        try:
            # Plugin names and options too (the backbone is built on the meta device: no cost).
            validate_plugins(config)
        except UserError as exc:
            raise ConfigError(f"bench cell {values}: {exc}") from None
        cells.append(Cell(values, config.to_dict()))
    slugs = [c.slug for c in cells]
    duplicates = sorted({s for s in slugs if slugs.count(s) > 1})
    if duplicates:
        raise ConfigError(f"bench cells would share a folder name: {duplicates}; give the "
                          "components distinct names")
    return cells


# Starts `wsss` in the cell process and, at exit, writes the process's own peak resident size.
# The rusage of a child (ru_maxrss) is no good here: Linux carries the high-water mark of the
# address space replaced by exec, i.e. of this (already large) bench process, into the child's
# figure.  VmHWM belongs to the cell's own address space.
_CELL_BOOT = """
import atexit, os, runpy, sys
def _write_peak():
    try:
        with open('/proc/self/status') as status:
            peak = next(line.split()[1] for line in status if line.startswith('VmHWM:'))
        with open(os.environ['WSSS_BENCH_PEAK_FILE'], 'w') as out:
            out.write(peak)
    except (OSError, StopIteration):
        pass
atexit.register(_write_peak)
sys.argv[0] = 'wsss'
runpy.run_module('wsss_bench.cli.main', run_name='__main__', alter_sys=True)
"""


@dataclass
class _Running:
    """A cell whose process is running."""

    cell: Cell
    cell_dir: Path
    proc: subprocess.Popen
    log: Any
    started: float


def _start_cell(cell: Cell, cell_dir: Path, store: Path, threads: Optional[int]) -> _Running:
    """Start one cell's ``wsss run`` in a child process."""
    config_file = cell_dir / "cell-config.yaml"
    io.write_yaml(config_file, cell.config)
    peak_file = cell_dir / ".peak-rss-kb"
    peak_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-c", _CELL_BOOT, "run", "--config", str(config_file),
           "--out", str(cell_dir), "--resume", "--cache-dir", str(store), "--quiet"]
    env = {**os.environ, "WSSS_BENCH_PEAK_FILE": str(peak_file)}
    if threads is not None:  # parallel cells share the cores instead of oversubscribing them
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    log = open(cell_dir / "cell.log", "ab")
    try:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    except BaseException:
        log.close()
        raise
    return _Running(cell, cell_dir, proc, log, time.perf_counter())


def _finish_cell(running: _Running, status: int, usage: Any) -> dict[str, Any]:
    """Wall time and peak memory of a cell whose process ended."""
    running.log.close()
    running.proc.returncode = os.waitstatus_to_exitcode(status)
    peak_file = running.cell_dir / ".peak-rss-kb"
    try:
        peak_kb, source = float(peak_file.read_text()), "VmHWM"
        peak_file.unlink()
    except (OSError, ValueError):  # no /proc (macOS): the rusage figure, an upper bound
        peak_kb, source = usage.ru_maxrss, "ru_maxrss"
    return {"returncode": running.proc.returncode, "seconds": time.perf_counter() - running.started,
            "peak_rss_mb": peak_kb / 1024.0, "peak_rss_source": source}


def _seed_of(cell: Cell) -> Any:
    return cell.config.get("seed")


def next_startable(pending: list[Cell], running_seeds: set[Any], finished_seeds: set[Any]) -> Optional[int]:
    """Index of the first pending cell that may start now, or ``None``.

    Cells of one seed share that seed's stages (the baseline classifier, its features): the
    first to run computes them and puts them in the store.  So a cell waits while another cell
    of its seed runs, until one cell of that seed has finished; from then on the shared stages
    are in the store and cells of the seed may run side by side.  (Two cells that both need a
    stage the first did not compute would both compute it; the store's writes are atomic and
    the outputs equal, so the cost is time, never a wrong result.)
    """
    for index, cell in enumerate(pending):
        seed = _seed_of(cell)
        if seed not in running_seeds or seed in finished_seeds:
            return index
    return None


def _finished_meta(cell_dir: Path, cell: Cell) -> Optional[dict[str, Any]]:
    """The ``cell.json`` of a cell that finished with exactly this config, else ``None``."""
    meta_file = cell_dir / "cell.json"
    if not (meta_file.is_file() and (cell_dir / "results.json").is_file()):
        return None
    meta = json.loads(meta_file.read_text())
    return meta if meta.get("config") == cell.config else None


def run_bench(path: Path, out: Optional[Path] = None,
              echo: Any = print, store: Optional[Path] = None,
              tables_only: bool = False, jobs: int = 1) -> dict[str, Any]:
    """Run (or continue) a bench and write its tables; returns the aggregate.

    ``tables_only`` runs nothing: it aggregates the cells finished so far.

    ``store`` (default ``OUT/store``) may be shared by several benches, so that e.g. the
    baseline classifiers of one bench serve another.

    ``jobs > 1`` runs that many cells at once, each with ``cpu_count // jobs`` threads (on a
    small CPU, single-threaded processes side by side get more done than one process with
    every thread).  Cells of one seed run one at a time until the first of them has finished
    (see :func:`next_startable`).
    """
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    spec = load_bench(path)
    cells = expand(spec)
    out = Path(out or Path("runs") / f"bench-{spec['name']}")
    (out / "cells").mkdir(parents=True, exist_ok=True)
    store = Path(store) if store is not None else out / "store"
    io.write_yaml(out / "bench.yaml", spec)
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    pending: list[tuple[int, Cell]] = []
    finished_seeds: set[Any] = set()
    for number, cell in enumerate(cells, 1):
        if _finished_meta(out / "cells" / cell.slug, cell) is not None:
            finished_seeds.add(_seed_of(cell))
            echo(f"[{number}/{len(cells)}] {cell.slug}: done, skipped")
        elif tables_only:
            echo(f"[{number}/{len(cells)}] {cell.slug}: not finished, left out of the tables")
        else:
            pending.append((number, cell))
    running: dict[int, _Running] = {}
    failure: Optional[str] = None
    try:
        while pending or running:
            while failure is None and len(running) < jobs:
                busy = {_seed_of(r.cell) for r in running.values()}
                pick = next_startable([c for _, c in pending], busy, finished_seeds)
                if pick is None:
                    break
                number, cell = pending.pop(pick)
                cell_dir = out / "cells" / cell.slug
                cell_dir.mkdir(parents=True, exist_ok=True)
                echo(f"[{number}/{len(cells)}] {cell.slug}")
                job = _start_cell(cell, cell_dir, store, threads)
                running[job.proc.pid] = job
            if not running:
                break
            pid, status, usage = os.wait4(-1, 0)
            job = running.pop(pid, None)
            if job is None:
                continue  # not one of ours
            meta = _finish_cell(job, status, usage)
            results_file = job.cell_dir / "results.json"
            if meta["returncode"] != 0 or not results_file.is_file():
                tail = (job.cell_dir / "cell.log").read_text(errors="replace").strip().splitlines()[-1:]
                failure = failure or (f"bench cell {job.cell.slug} failed (exit {meta['returncode']}): "
                                      f"{tail[0] if tail else 'no output'}; see {job.cell_dir / 'cell.log'}")
                continue  # let the running cells finish (they resume anyway), start no new ones
            io.write_json(job.cell_dir / "cell.json", {"config": job.cell.config, "values": job.cell.values, **meta})
            finished_seeds.add(_seed_of(job.cell))
    except BaseException:
        for job in running.values():  # Ctrl-C or a crash here: do not leave orphans behind
            job.proc.terminate()
            job.proc.wait()
            job.log.close()
        raise
    if failure is not None:
        raise ConfigError(failure)
    records = []
    for cell in cells:
        cell_dir = out / "cells" / cell.slug
        meta = _finished_meta(cell_dir, cell)
        if meta is not None:
            records.append({"cell": cell, "results": json.loads((cell_dir / "results.json").read_text()),
                            "meta": meta})
    return write_tables(spec, records, out)


def _group_key(values: dict[str, Any]) -> tuple:
    return tuple((k, json.dumps(v, sort_keys=True)) for k, v in values.items() if k != "seed")


def _show(value: Any) -> Any:
    """A table cell for an axis value (a component mapping shows its name)."""
    return value["name"] if isinstance(value, dict) and "name" in value else value


def aggregate(spec: dict[str, Any], records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std over seeds of each cell group's final mIoU per split and stage."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for rec in records:
        groups.setdefault(_group_key(rec["cell"].values), []).append(rec)
    rows = []
    for key, recs in groups.items():
        by_row: dict[tuple, list[float]] = {}
        by_policy: dict[tuple, dict[str, list[float]]] = {}
        protocols: dict[tuple, dict[str, Any]] = {}
        for rec in recs:
            for r in rec["results"]["rows"]:
                ident = (r["split"], r.get("round", ""), r["protocol"]["stage"])
                by_row.setdefault(ident, []).append(r["miou"])
                protocols[ident] = r["protocol"]
                for name, policy in (r.get("policies") or {}).items():
                    by_policy.setdefault(ident, {}).setdefault(name, []).append(policy["miou"])
        seeds = [rec["cell"].values.get("seed", rec["results"].get("seed")) for rec in recs]
        for ident, values in sorted(by_row.items(), key=lambda kv: (str(kv[0][1]), kv[0][0])):
            arr = np.array(values, dtype=float)
            rows.append({
                "group": dict((k, json.loads(v)) for k, v in key), "split": ident[0],
                "round": ident[1], "stage": ident[2], "n": int(arr.size),
                "miou_mean": float(arr.mean()), "miou_std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
                "mious": arr.tolist(), "seeds": seeds, "protocol": protocols[ident],
                # Other threshold policies of the same CAMs (mean over seeds; oracle = upper bound).
                "policies": {name: float(np.mean(v)) for name, v in by_policy.get(ident, {}).items()
                             if len(v) == arr.size},
                "seconds_mean": float(np.mean([r["meta"]["seconds"] for r in recs])),
                "peak_rss_mb_max": float(max(r["meta"]["peak_rss_mb"] for r in recs)),
            })
    return rows


def paired_deltas(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row against its split's baseline (the split's first row), paired by seed.

    Seeds are the natural pairing: cells of one seed share data order, initialisation and (in a
    shared store) the very same baseline classifier, so per-seed differences remove most of
    the run-to-run variance.  ``beyond_spread``: the difference of the means is larger than the
    sample std over seeds of both the row and the baseline.
    """
    baselines: dict[str, dict[str, Any]] = {}
    for r in rows:
        baselines.setdefault(r["split"], r)
    out = []
    for r in rows:
        base = baselines[r["split"]]
        if r is base:
            continue
        base_by_seed = {s: m for s, m in zip(base["seeds"], base["mious"]) if s is not None}
        diffs = [m - base_by_seed[s] for s, m in zip(r["seeds"], r["mious"]) if s in base_by_seed]
        if not diffs:
            continue
        diff = np.array(diffs)
        if not diff.any():
            continue  # the baseline itself (e.g. the round-0 classifier every cell shares)
        gap = abs(r["miou_mean"] - base["miou_mean"])
        out.append({"row": r, "baseline": base, "n": int(diff.size), "mean": float(diff.mean()),
                    "std": float(diff.std(ddof=1)) if diff.size > 1 else 0.0,
                    "beyond_spread": bool(gap > r["miou_std"] and gap > base["miou_std"])})
    return out


def write_tables(spec: dict[str, Any], records: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    """``bench.md``, ``bench.csv``, ``bench.json`` and ``bench.tex``."""
    rows = aggregate(spec, records)
    labels = spec.get("labels") or {}
    axes = [k for k in (spec.get("matrix") or {}) if k != "seed"]
    titles = [labels.get(a, a) for a in axes]
    policies = [p for p in ("heldout", "oracle") if any(p in r.get("policies", {}) for r in rows)]
    policy_titles = {"heldout": "held-out thr. %", "oracle": "oracle thr. % (upper bound)"}
    header = [*titles, "split", "round", "stage", "mIoU % (mean ± std)",
              *[policy_titles[p] for p in policies], "n seeds", "time / cell (s)", "peak RSS (MB)"]
    table = []
    for r in rows:
        table.append([*[_show(r["group"].get(a)) for a in axes], r["split"], r["round"], r["stage"],
                      f"{pct(r['miou_mean'])} ± {pct(r['miou_std'])}",
                      *[pct(r["policies"][p]) if p in r.get("policies", {}) else "" for p in policies],
                      r["n"], f"{r['seconds_mean']:.0f}", f"{r['peak_rss_mb_max']:.0f}"])
    deltas = paired_deltas(rows)
    delta_table = [[*[_show(d["row"]["group"].get(a)) for a in axes], d["row"]["split"], d["row"]["round"],
                    d["row"]["stage"], f"{100 * d['mean']:+.1f} ± {100 * d['std']:.1f}", d["n"],
                    "yes" if d["beyond_spread"] else "no"] for d in deltas]
    proto = rows[0]["protocol"] if rows else {}
    seeds = sorted({s for r in rows for s in r["seeds"] if s is not None})
    md = [f"# Bench: {spec['name']}", "",
          f"Protocol: CAM seeds (stage `cam` = head-weight CAM; other stages name the post-hoc "
          f"method), threshold policy `{proto.get('threshold_policy')}` (background score "
          f"{proto.get('threshold')}), ignore label {proto.get('ignore_index')}, mIoU over "
          f"{proto.get('mean_over')}; seeds {seeds}; std is the sample std over seeds.", "",
          markdown_table(header, table), ""]
    if deltas:
        base = deltas[0]["baseline"]
        named = ", ".join(f"{t} {_show(base['group'].get(a))}" for t, a in zip(titles, axes))
        md += ["## Against the baseline", "",
               f"Baseline: the first row of each split ({named}, "
               f"round {base['round']}, stage `{base['stage']}`). Δ is paired by seed (same seed, "
               "same data order; mean ± sample std of the per-seed differences, fixed threshold). "
               "*Beyond spread*: the difference of the means exceeds the run-to-run std over "
               "seeds of both the row and the baseline. Rows equal to the baseline seed for seed "
               "(the shared round-0 classifier) are left out.", "",
               markdown_table([*titles, "split", "round", "stage", "Δ mIoU points (paired)", "n seeds",
                               "beyond spread"], delta_table), ""]
    io.write_text(out / "bench.md", "\n".join(md))
    buffer = _io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([*axes, "split", "round", "stage", "miou_mean", "miou_std", "n", "mious",
                     "threshold_policy", "threshold", "ignore_index", "seconds_mean", "peak_rss_mb_max"])
    for r in rows:
        writer.writerow([*[_show(r["group"].get(a)) for a in axes], r["split"], r["round"], r["stage"],
                         f"{r['miou_mean']:.6f}", f"{r['miou_std']:.6f}", r["n"],
                         " ".join(f"{m:.6f}" for m in r["mious"]), r["protocol"].get("threshold_policy"),
                         r["protocol"].get("threshold"), r["protocol"].get("ignore_index"),
                         f"{r['seconds_mean']:.2f}", f"{r['peak_rss_mb_max']:.1f}"])
    io.write_text(out / "bench.csv", buffer.getvalue())
    io.write_json(out / "bench.json", {"name": spec["name"], "spec": spec, "rows": rows,
                                       "deltas": [{k: v for k, v in d.items() if k not in ("row", "baseline")}
                                                  | {"split": d["row"]["split"], "group": d["row"]["group"],
                                                     "round": d["row"]["round"], "stage": d["row"]["stage"]}
                                                  for d in deltas]})
    io.write_text(out / "bench.tex", latex_table(titles, axes, rows))
    return {"rows": rows, "out": str(out), "markdown": "\n".join(md)}


def latex_table(titles: list[str], axes: list[str], rows: list[dict[str, Any]]) -> str:
    """A booktabs table: axes, split, round, stage, mIoU mean ± std."""
    def esc(text: Any) -> str:
        return re.sub(r"([_%&#$])", r"\\\1", str(text))

    cols = "l" * (len(titles) + 3) + "r"
    lines = [r"\begin{tabular}{" + cols + "}", r"\toprule",
             " & ".join([*map(esc, titles), "split", "round", "stage", r"mIoU (\%)"]) + r" \\", r"\midrule"]
    for r in rows:
        cells = [*[esc(_show(r["group"].get(a))) for a in axes], esc(r["split"]), esc(r["round"]), esc(r["stage"]),
                 f"${100 * r['miou_mean']:.1f} \\pm {100 * r['miou_std']:.1f}$"]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(lines)
