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
memory is its own and a crash cannot take the bench down), which a launcher plugin starts: a
local process, a SLURM job, a Ray task (:mod:`.dispatch`, :mod:`wsss_bench.launching`).  All cells share one
content-addressed store ``OUT/store``: a classifier, a feature set or a CAM folder whose inputs
were computed by an earlier cell is linked, not recomputed.  A finished cell is skipped on
re-runs; an interrupted one resumes.
"""
from __future__ import annotations

import copy
import csv
import io as _io
import itertools
import json
import os
import re
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from scipy import stats

from .. import io
from ..config import deep_merge, load_config, parse_override, read_yaml_file
from ..errors import ConfigError, DataError, UserError
from ..evaluation.evaluate import load_confusions
from ..evaluation.miou import miou_from_confusions
from ..evaluation.rows import CAM, REFINED, SEG, migrate_row
from ..evaluation.tables import markdown_table, pct
from . import runlock
from .cells import Cell, cell_status, finished_meta, next_startable, seed_of  # noqa: F401 - next_startable re-exported
from .runner import preflight

BENCH_KEYS = {"name", "preset", "base", "matrix", "labels", "description", "overrides", "launcher"}
#: What starts the cells when neither ``--launcher`` nor the bench file names a launcher.
DEFAULT_LAUNCHER = "local"

#: Family-wise error rate of the seed intervals of one table (Holm), and the bootstrap's level.
ALPHA = 0.05
#: Image resamples of the paired bootstrap, and its fixed RNG seed (tables are reproducible).
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
#: Splits whose images are resampled.  Only held-out images: the bootstrap treats the trained
#: models as fixed and the images as draws from a population, which training images are not
#: (the classifier saw them).
BOOTSTRAP_SPLITS = ("val",)


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
    # The name becomes a folder under runs/: checked like a split id, so `../x` cannot escape.
    if not isinstance(spec["name"], str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", spec["name"]) \
            or spec["name"] in (".", ".."):
        raise ConfigError(f"{path}: bench name {spec['name']!r} must be letters, digits, '_', '-' or '.' "
                          "(it names a folder)")
    section = spec.get("launcher")
    if section is not None and not (
            isinstance(section, dict) and set(section) <= {"name", "options"}
            and isinstance(section.get("name", ""), str) and isinstance(section.get("options") or {}, dict)):
        raise ConfigError(f"{path}: 'launcher' must be {{name: NAME, options: {{...}}}}, e.g. "
                          "{name: submitit, options: {partition: gpu}}")
    return spec


def apply_overrides(spec: dict[str, Any], preset: Optional[str] = None,
                    seeds: Optional[list[int]] = None, sets: tuple[str, ...] = ()) -> dict[str, Any]:
    """A quick-look variant of a bench: another preset, other seeds, ``--set`` layered on ``base``.

    ``--set`` lies over the bench's ``base`` and under its matrix axes, so an axis cannot be set
    (that would silently collapse a column).  The result records ``overrides`` (None when there
    are none), which names its default folder and marks its tables.
    """
    overrides = {"preset": preset, "seeds": list(seeds) if seeds is not None else None, "set": list(sets)}
    if preset is None and seeds is None and not sets:
        return {**spec, "overrides": None}
    out = copy.deepcopy(spec)
    if preset is not None:
        out["preset"] = preset
    if seeds is not None:
        out.setdefault("matrix", {})["seed"] = list(seeds)
    axes = list(out.get("matrix") or {})
    for text in sets:
        key = text.split("=", 1)[0].strip()
        clash = [a for a in axes if key == a or key.startswith(a + ".") or a.startswith(key + ".")]
        if clash:
            raise ConfigError(f"--set {text!r} sets the bench's matrix axis {clash[0]!r}; change the "
                              "axis in the bench file (or --seeds for the seed axis) instead")
        out["base"] = deep_merge(out.get("base") or {}, parse_override(text))
    out["overrides"] = overrides
    return out


def overrides_digest(overrides: Optional[dict[str, Any]]) -> str:
    """Eight hex digits naming a set of overrides (default folder ``runs/bench-<name>-<digest>``)."""
    import hashlib

    return hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:8]


def quick_look_line(overrides: Optional[dict[str, Any]]) -> Optional[str]:
    """The line that marks a table made with overrides, so it is never taken for the real one."""
    if not overrides:
        return None
    parts = []
    if overrides.get("preset"):
        parts.append(f"preset {overrides['preset']}")
    if overrides.get("seeds") is not None:
        parts.append(f"seeds {overrides['seeds']}")
    parts += [f"--set {s}" for s in overrides.get("set") or []]
    return "quick look: " + ", ".join(parts) + " (not the shipped bench's settings)"


def check_out_overrides(out: Path, overrides: Optional[dict[str, Any]], force: bool) -> None:
    """Refuse to mix cells made with other overrides into ``out`` (unless ``force``)."""
    previous_file = out / "bench.yaml"
    if force or not previous_file.is_file():
        return
    previous = (read_yaml_file(previous_file) or {}).get("overrides")
    if (previous or None) != (overrides or None):
        raise ConfigError(f"{out} holds a bench made with other overrides ({quick_look_line(previous) or 'none'}); "
                          "choose another --out or pass --force")


def expand(spec: dict[str, Any], strict: bool = True) -> list[Cell]:
    """Every combination of the matrix values, each validated as a full config.

    Each cell gets the checks a run makes before it writes anything (:func:`preflight`:
    config values, plugins and their options, device, data root, weights files).  ``strict``
    raises the first rejection; otherwise a rejected cell carries its ``error`` and the bench
    runs the others.
    """
    matrix = spec.get("matrix") or {}
    keys = list(matrix)
    cells = []
    for combo in itertools.product(*(matrix[k] for k in keys)):
        values = dict(zip(keys, combo))
        layer = spec.get("base") or {}
        for key, value in values.items():
            layer = deep_merge(layer, parse_override(f"{key}={json.dumps(_config_value(value))}"))
        try:
            config = load_config(spec.get("preset"), None, [layer])  # validates now, not mid-bench
            preflight(config)
        except UserError as exc:
            if strict:
                raise ConfigError(f"bench cell {values}: {exc}") from None
            cells.append(Cell(values, layer, error=str(exc)))
            continue
        cells.append(Cell(values, config.to_dict()))
    slugs = [c.slug for c in cells]
    duplicates = sorted({s for s in slugs if slugs.count(s) > 1})
    if duplicates:
        raise ConfigError(f"bench cells would share a folder name: {duplicates}; give the "
                          "components distinct names or labels ({name: ..., label: ..., options: ...})")
    return cells


def run_bench(path: Path, out: Optional[Path] = None,
              echo: Any = print, store: Optional[Path] = None,
              tables_only: bool = False, jobs: int = 1, preset: Optional[str] = None,
              seeds: Optional[list[int]] = None, sets: tuple[str, ...] = (),
              force: bool = False, launcher: Optional[str] = None,
              launcher_options: Sequence[str] = ()) -> dict[str, Any]:
    """Run (or continue) a bench and write its tables; returns the aggregate.

    ``tables_only`` runs nothing: it aggregates the cells finished so far.

    ``store`` (default ``OUT/store``) may be shared by several benches, so that e.g. the
    baseline classifiers of one bench serve another.

    ``jobs > 1`` runs that many cells at once, each with ``cpu_count // jobs`` threads (on a
    small CPU, single-threaded processes side by side get more done than one process with
    every thread).  Cells of one seed run one at a time until the first of them has finished
    (see :func:`next_startable`).

    A cell that fails (or whose config is rejected) does not stop the bench: the other cells
    run, the tables mark what is failed or missing, and the returned ``cells`` say so (the CLI
    then exits non-zero).  A failed cell is tried again on the next run of the bench.

    ``preset``, ``seeds`` and ``sets`` give a quick look (:func:`apply_overrides`): its default
    folder is its own, and an ``out`` made with other overrides is refused unless ``force``.

    ``launcher`` (a plugin of kind ``launcher``; default the bench file's ``launcher.name``, else
    ``local``) starts the cells: local processes, SLURM jobs, Ray tasks.  Whatever starts them,
    a cell is the same command in the same folder with the same thread count, so the tables do
    not depend on it.  ``launcher_options`` are ``KEY=VALUE`` strings over the file's
    ``launcher.options``.  A bench interrupted on any launcher resumes with the same call: a
    cell still running under an earlier driver is attached to, never submitted twice
    (:mod:`.dispatch`).
    """
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    spec = apply_overrides(load_bench(path), preset, seeds, sets)
    # A misspelt launcher or option fails now, not after the first cells.
    chosen_launcher = checked_launcher(spec, launcher, launcher_options) if not tables_only else \
        resolve_launcher(spec, launcher, launcher_options)
    cells = expand(spec, strict=False)
    suffix = f"-{overrides_digest(spec['overrides'])}" if spec["overrides"] else ""
    out = Path(out or Path("runs") / f"bench-{spec['name']}{suffix}")
    check_out_overrides(out, spec["overrides"], force)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    if not tables_only:
        runlock.acquire(out)  # one bench process per folder (a second one would race its cells)
    try:
        return _run_cells(spec, cells, out, echo, store, tables_only, jobs, chosen_launcher)
    finally:
        if not tables_only:
            runlock.release(out)


def resolve_launcher(spec: dict[str, Any], name: Optional[str] = None,
                     options: Sequence[str] = ()) -> tuple[str, dict[str, Any]]:
    """The launcher's name and options: ``--launcher``/``--launcher-opt KEY=VALUE`` over the
    bench file's ``launcher: {name, options}``, else ``local``.  Options given in the file for
    another launcher than the one chosen are not passed on."""
    section = spec.get("launcher") or {}
    chosen = name or section.get("name") or DEFAULT_LAUNCHER
    merged = dict(section.get("options") or {}) if section.get("name", chosen) == chosen else {}
    for text in options:
        if "=" not in text or not text.split("=", 1)[0].strip():
            raise ConfigError(f"--launcher-opt {text!r}: expected KEY=VALUE, e.g. partition=gpu")
        key, raw = text.split("=", 1)
        merged = deep_merge(merged, parse_override(f"{key.strip()}={raw}"))
    return chosen, merged


def checked_launcher(spec: dict[str, Any], name: Optional[str] = None,
                     options: Sequence[str] = ()) -> tuple[str, dict[str, Any]]:
    """:func:`resolve_launcher`, with the name and options checked against the registered
    launcher (an unknown name or option is a one-line error)."""
    from ..plugins import registry

    chosen, merged = resolve_launcher(spec, name, options)
    registry("launcher").get(chosen).validate_options(merged)
    return chosen, merged


def open_launcher(name: str, options: dict[str, Any], out: Path) -> Any:
    """Create the launcher plugin and start it with its folder ``OUT/launcher/<name>``."""
    from ..plugins import registry

    launcher = registry("launcher").create(name, **options)
    launcher.start((out / "launcher" / name).resolve())
    return launcher


def _run_cells(spec: dict[str, Any], cells: list[Cell], out: Path, echo: Any, store: Optional[Path],
               tables_only: bool, jobs: int, launcher: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    """The cell loop of :func:`run_bench` (:class:`.dispatch.Dispatcher`), then the tables."""
    from .dispatch import Dispatcher

    store = Path(store) if store is not None else out / "store"
    store.mkdir(parents=True, exist_ok=True)  # a cell checks it sees the store before it starts
    io.write_yaml(out / "bench.yaml", spec)
    finished_seeds: set[Any] = set()
    unfinished: list[tuple[int, Cell]] = []
    for number, cell in enumerate(cells, 1):
        if cell.error is not None:
            echo(f"[{number}/{len(cells)}] {cell.slug}: invalid config, not run: {cell.error}")
        elif finished_meta(out / "cells" / cell.slug, cell) is not None:
            finished_seeds.add(seed_of(cell))
            echo(f"[{number}/{len(cells)}] {cell.slug}: done, skipped")
        elif tables_only:
            echo(f"[{number}/{len(cells)}] {cell.slug}: not finished, left out of the tables")
        else:
            unfinished.append((number, cell))
    if unfinished:
        name, options = launcher
        made = open_launcher(name, options, out)
        try:
            dispatcher = Dispatcher(out, store, made, name, jobs, len(cells), echo, finished_seeds)
            for number, cell in unfinished:
                dispatcher.adopt(number, cell)
            dispatcher.run()
        finally:
            made.close()
    records, statuses = [], []
    for cell in cells:
        cell_dir = out / "cells" / cell.slug
        statuses.append({"cell": cell, "dir": cell_dir, **cell_status(cell_dir, cell)})
        meta = finished_meta(cell_dir, cell)
        if meta is not None:
            records.append({"cell": cell, "results": json.loads((cell_dir / "results.json").read_text()),
                            "meta": meta, "dir": cell_dir})
    return write_tables(spec, records, out, statuses)


def _group_key(values: dict[str, Any]) -> tuple:
    return tuple((k, json.dumps(v, sort_keys=True)) for k, v in values.items() if k != "seed")


def _show(value: Any) -> Any:
    """A table cell for an axis value (a component mapping shows its label, else its name)."""
    if isinstance(value, dict):
        return value.get("label", value.get("name", value))
    return value


def _config_value(value: Any) -> Any:
    """An axis value as the config sees it: a component's display ``label`` is the bench's own."""
    if isinstance(value, dict) and "label" in value:
        return {k: v for k, v in value.items() if k != "label"}
    return value


def aggregate(spec: dict[str, Any], records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std over seeds of each cell group's mIoU per split, round, CAM method and stage.

    ``seeds`` and ``confusions`` (the path of each seed's per-image confusion file, ``None``
    where a cell has none) are aligned with ``mious``.  A record's ``dir`` is its cell folder.
    """
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for rec in records:
        groups.setdefault(_group_key(rec["cell"].values), []).append(rec)
    rows = []
    for key, recs in groups.items():
        by_row: dict[tuple, list[float]] = {}
        by_policy: dict[tuple, dict[str, list[float]]] = {}
        protocols: dict[tuple, dict[str, Any]] = {}
        # Per row, not per group: a cell lacking a row must not shift the seed pairing.
        seeds_by_row: dict[tuple, list[Any]] = {}
        files_by_row: dict[tuple, list[Optional[str]]] = {}
        ami_by_row: dict[tuple, list[float]] = {}
        for rec in recs:
            seed = rec["cell"].values.get("seed", rec["results"].get("seed"))
            for r in rec["results"]["rows"]:
                r = migrate_row(r)  # cells written before the pipeline had stages
                ident = (r["split"], r.get("round", ""), r["protocol"]["cam_method"], r["stage"])
                by_row.setdefault(ident, []).append(r["miou"])
                seeds_by_row.setdefault(ident, []).append(seed)
                files_by_row.setdefault(ident, []).append(
                    str(Path(rec["dir"]) / r["confusions"]) if rec.get("dir") and r.get("confusions") else None)
                protocols[ident] = r["protocol"]
                for name, policy in (r.get("policies") or {}).items():
                    by_policy.setdefault(ident, {}).setdefault(name, []).append(policy["miou"])
                if r.get("subtype_ami") is not None:  # SC-CAM rounds on data with declared sub-types
                    ami_by_row.setdefault(ident, []).append(float(r["subtype_ami"]))
        # Stage order of the pipeline (CAMs, refined masks, segmentation), then round and split.
        for ident, values in sorted(by_row.items(), key=lambda kv: (_stage_rank(kv[0][3]), str(kv[0][1]), kv[0][0])):
            arr = np.array(values, dtype=float)
            rows.append({
                "group": dict((k, json.loads(v)) for k, v in key), "split": ident[0],
                "round": ident[1], "cam_method": ident[2], "stage": ident[3], "n": int(arr.size),
                "miou_mean": float(arr.mean()), "miou_std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
                "mious": arr.tolist(), "seeds": seeds_by_row[ident], "confusions": files_by_row[ident],
                "protocol": protocols[ident],
                # Other threshold policies of the same CAMs (mean over seeds; oracle = upper bound).
                "policies": {name: float(np.mean(v)) for name, v in by_policy.get(ident, {}).items()
                             if len(v) == arr.size},
                # Mean sub-type AMI of the round's clusters over seeds (None where not measured).
                "subtype_ami_mean": (float(np.mean(ami_by_row[ident]))
                                     if len(ami_by_row.get(ident, [])) == arr.size else None),
                "seconds_mean": float(np.mean([r["meta"]["seconds"] for r in recs])),
                "peak_rss_mb_max": float(max(r["meta"]["peak_rss_mb"] for r in recs)),
            })
    return rows


def paired_t_test(diffs: Sequence[float]) -> tuple[float, float, float]:
    """One-sample t-test of paired differences against 0: ``(mean, standard error, p)``.

    ``p`` is two-sided with ``n - 1`` degrees of freedom.  Differences that are all equal (and
    not 0) have no spread: standard error 0 and p = 0, the limit of the t statistic.
    """
    d = np.asarray(diffs, dtype=float)
    if d.size < 2:
        raise ValueError(f"a paired t-test needs at least 2 differences, got {d.size}")
    mean = float(d.mean())
    se = float(d.std(ddof=1) / np.sqrt(d.size))
    if se == 0.0:
        return mean, 0.0, 0.0 if mean != 0.0 else 1.0
    p = float(2.0 * stats.t.sf(abs(mean / se), d.size - 1))
    return mean, se, p


def t_interval(diffs: Sequence[float], level: float = 1.0 - ALPHA) -> tuple[float, float]:
    """The two-sided ``level`` t-interval of the mean of paired differences (``n - 1`` d.o.f.)."""
    mean, se, _ = paired_t_test(diffs)
    half = float(stats.t.ppf(0.5 + level / 2.0, len(diffs) - 1)) * se
    return mean - half, mean + half


def holm(pvalues: Sequence[float], alpha: float = ALPHA) -> tuple[list[float], list[int]]:
    """Holm-adjusted p-values and each hypothesis's step multiplier, in the input order.

    Sorted ascending, hypothesis j (1-based) is tested at ``alpha / (m - j + 1)`` while every
    earlier one was rejected; its adjusted p-value is ``max_{i <= j} min(1, (m - i + 1) p_(i))``
    and it is rejected iff that is below ``alpha``.  The multiplier is ``m - j + 1`` for the
    rejected steps; once the step-down stops at step k, every later hypothesis keeps step k's
    multiplier ``m - k + 1`` (see :func:`paired_deltas` for why).  Ties keep the input order.
    """
    p = np.asarray(pvalues, dtype=float)
    m = p.size
    order = np.argsort(p, kind="stable")
    steps = m - np.arange(m)                        # m, m-1, ..., 1
    adjusted_sorted = np.minimum(1.0, np.maximum.accumulate(steps * p[order]))
    rejected = int((adjusted_sorted < alpha).sum())  # monotone: the first `rejected` steps
    multiplier_sorted = np.where(np.arange(m) < rejected, steps, m - rejected)
    adjusted = np.empty(m)
    multipliers = np.empty(m, dtype=int)
    adjusted[order] = adjusted_sorted
    multipliers[order] = multiplier_sorted
    return adjusted.tolist(), multipliers.tolist()


def separated(n: int, interval: Optional[Sequence[float]]) -> str:
    """``yes`` when the (corrected) interval excludes 0, ``no`` when it holds 0, ``n/a`` with
    fewer than 2 paired seeds (no interval)."""
    if n < 2 or interval is None:
        return "n/a"
    low, high = interval
    return "yes" if low > 0.0 or high < 0.0 else "no"


def paired_deltas(rows: list[dict[str, Any]], alpha: float = ALPHA) -> list[dict[str, Any]]:
    """Each row against its baseline (the first row of its split and pipeline stage), paired by seed.

    Seeds are the natural pairing: cells of one seed share data order, initialisation and (in a
    shared store) the very same baseline classifier, so per-seed differences remove most of
    the run-to-run variance.  ``beyond_spread`` (kept for older readers; the tables show
    ``separated``): the difference of the means is larger than the sample std over seeds of
    both the row and the baseline.

    Seed intervals: a paired t-test and t-interval of the per-seed differences (training seeds
    vary, the images are the same every seed), Holm-corrected over the family of the returned
    rows with at least 2 paired seeds (the rows of one table).  Row i's interval has level
    ``1 - alpha / m_i`` with m_i its Holm step multiplier (:func:`holm`), so it excludes 0
    exactly when Holm rejects (adjusted p below ``alpha``): for a rejected row, m_i is its own
    step's; the rows where the step-down stopped all get the stopping step's m - k + 1, which
    is also the Holm-consistent simultaneous interval of Strassburger & Bretz (2008) for the
    non-rejected set (Bonferroni over it).  For rejected rows that procedure only certifies
    the sign; the two-sided interval at the step's level shown here is the informative,
    decision-consistent choice, not a guaranteed joint coverage (all rows at ``1 - alpha/m``,
    plain Bonferroni, would be, at the cost of disagreeing with Holm's decisions).

    Added keys: ``seeds`` and ``diffs`` (paired), ``p_value``, ``p_holm``, ``ci_level``,
    ``ci`` (``[low, high]`` fraction, or ``None``) and ``separated`` (:func:`separated`).
    """
    # Refined masks are compared with the baseline's refined masks, CAMs with its CAMs.
    baselines: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        baselines.setdefault((r["split"], r.get("stage", "cam")), r)
    out = []
    for r in rows:
        base = baselines[(r["split"], r.get("stage", "cam"))]
        if r is base:
            continue
        base_by_seed = {s: m for s, m in zip(base["seeds"], base["mious"]) if s is not None}
        paired = [(s, m - base_by_seed[s]) for s, m in zip(r["seeds"], r["mious"]) if s in base_by_seed]
        if not paired:
            continue
        diff = np.array([d for _, d in paired])
        if not diff.any():
            continue  # the baseline itself (e.g. the round-0 classifier every cell shares)
        gap = abs(r["miou_mean"] - base["miou_mean"])
        out.append({"row": r, "baseline": base, "n": int(diff.size), "mean": float(diff.mean()),
                    "std": float(diff.std(ddof=1)) if diff.size > 1 else 0.0,
                    "beyond_spread": bool(gap > r["miou_std"] and gap > base["miou_std"]),
                    "seeds": [s for s, _ in paired], "diffs": diff.tolist(),
                    "p_value": None, "p_holm": None, "ci_level": None, "ci": None, "separated": "n/a"})
    family = [d for d in out if d["n"] >= 2]
    for d in family:
        d["p_value"] = paired_t_test(d["diffs"])[2]
    adjusted, multipliers = holm([d["p_value"] for d in family], alpha)
    for d, p_holm, m_i in zip(family, adjusted, multipliers):
        d["p_holm"], d["ci_level"] = p_holm, 1.0 - alpha / m_i
        d["ci"] = list(t_interval(d["diffs"], d["ci_level"]))
        d["separated"] = separated(d["n"], d["ci"])
    return out


def bootstrap_miou_difference(pairs: Sequence[tuple[np.ndarray, np.ndarray]],
                              resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                              level: float = 1.0 - ALPHA) -> dict[str, Any]:
    """Paired per-image bootstrap of the mIoU difference ``a - b``, pooled over training seeds.

    ``pairs`` holds, per training seed, the per-image confusions ``[N, K, K]`` of method a and
    of method b over the same N images in the same order.  Each resample draws N image indices
    with replacement (one draw shared by both methods and every seed: the images are the
    sampled unit, the models fixed), sums the drawn images' confusions and takes the mIoU
    difference; the per-seed differences are averaged per resample.  Returns the percentile
    interval (``low``, ``high``), the full-sample ``estimate`` (mean over seeds) and the
    settings.  Vectorised: the resample counts form a ``[R, N]`` matrix, the summed confusions
    one product with the ``[N, K*K]`` per-image counts (exact in float64 below 2**53 pixels).
    """
    if not pairs:
        raise ValueError("bootstrap_miou_difference needs at least one (a, b) pair")
    n = pairs[0][0].shape[0]
    for a, b in pairs:
        if a.shape != b.shape or a.shape[0] != n or a.ndim != 3:
            raise ValueError(f"confusions of shapes {a.shape} and {b.shape}: expected equal [N, K, K], N = {n}")
    if n == 0:
        raise ValueError("no images to resample")
    flat = [(a.reshape(n, -1).astype(np.float64), b.reshape(n, -1).astype(np.float64)) for a, b in pairs]
    k = pairs[0][0].shape[1]
    rng = np.random.default_rng(seed)
    diffs = np.empty(resamples)
    block = max(1, min(resamples, (1 << 22) // n))   # bounds the [block, N] count matrix's memory
    for start in range(0, resamples, block):
        size = min(block, resamples - start)
        index = rng.integers(0, n, size=(size, n))
        counts = np.bincount((np.arange(size)[:, None] * n + index).ravel(),
                             minlength=size * n).reshape(size, n).astype(np.float64)
        per_seed = [miou_from_confusions((counts @ a).reshape(size, k, k))
                    - miou_from_confusions((counts @ b).reshape(size, k, k)) for a, b in flat]
        diffs[start:start + size] = np.mean(per_seed, axis=0)
    estimate = float(np.mean([miou_from_confusions(a.sum(0)) - miou_from_confusions(b.sum(0)) for a, b in pairs]))
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.nanpercentile(diffs, [tail, 100.0 - tail])
    return {"low": float(low), "high": float(high), "estimate": estimate, "level": level,
            "resamples": resamples, "rng_seed": seed, "n_images": n, "n_seeds": len(pairs)}


def add_bootstrap(deltas: list[dict[str, Any]], splits: Sequence[str] = BOOTSTRAP_SPLITS,
                  resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> None:
    """Set each delta's ``bootstrap`` (:func:`bootstrap_miou_difference`, or ``None``).

    Seeds whose cells both have a per-image confusion file are used, over the images common
    to all of them; ``None`` where no seed has both files (runs from before they were
    written), or where the row's split is not in ``splits`` (``bootstrap_split`` says which).
    """
    cache: dict[str, tuple[np.ndarray, list[str]]] = {}

    def load(path: str) -> tuple[np.ndarray, list[str]]:
        if path not in cache:
            cache[path] = load_confusions(Path(path))
        return cache[path]

    for d in deltas:
        d["bootstrap"] = None
        d["bootstrap_split"] = d["row"]["split"] in splits
        if not d["bootstrap_split"]:
            continue
        files = {}
        for side in ("row", "baseline"):
            r = d[side]
            files[side] = {s: f for s, f in zip(r["seeds"], r.get("confusions") or []) if f and Path(f).is_file()}
        seeds = [s for s in d["seeds"] if s in files["row"] and s in files["baseline"]]
        if not seeds:
            continue
        loaded = [(load(files["row"][s]), load(files["baseline"][s])) for s in seeds]
        common = set(loaded[0][0][1])
        for (_, ids_a), (_, ids_b) in loaded:
            common &= set(ids_a) & set(ids_b)
        order = [i for i in loaded[0][0][1] if i in common]
        if not order:
            continue
        pairs = []
        for (conf_a, ids_a), (conf_b, ids_b) in loaded:
            if conf_a.shape[1:] != conf_b.shape[1:]:
                raise DataError(f"per-image confusions of {d['row']['split']} have {conf_a.shape[1]} and "
                                f"{conf_b.shape[1]} classes; the bench rows are not comparable")
            pos_a = {i: n for n, i in enumerate(ids_a)}
            pos_b = {i: n for n, i in enumerate(ids_b)}
            pairs.append((conf_a[[pos_a[i] for i in order]], conf_b[[pos_b[i] for i in order]]))
        d["bootstrap"] = bootstrap_miou_difference(pairs, resamples, seed)


def _points(value: float) -> str:
    return f"{100 * value:+.1f}"


def _ci_cell(d: dict[str, Any]) -> str:
    if d["ci"] is None:
        return "n/a"
    return f"[{_points(d['ci'][0])}, {_points(d['ci'][1])}] ({100 * d['ci_level']:.1f} %)"


def _p_cell(p: Optional[float]) -> str:
    return "n/a" if p is None else "<0.001" if p < 0.001 else f"{p:.3f}"


def _bootstrap_cell(d: dict[str, Any]) -> str:
    if not d.get("bootstrap_split"):
        return "–"
    boot = d.get("bootstrap")
    return "n/a" if boot is None else f"[{_points(boot['low'])}, {_points(boot['high'])}]"


def _relative(path: Optional[str], out: Path) -> Optional[str]:
    """A confusion file's path as bench.json records it: relative to the bench folder."""
    if path is None:
        return None
    try:
        return os.path.relpath(path, out)
    except ValueError:   # another drive (Windows)
        return path


def _absent_cells(statuses: Sequence[dict[str, Any]]) -> dict[tuple, list[tuple[Any, str]]]:
    """Per cell group (the axes but the seed): ``(seed, status)`` of its cells not done."""
    absent: dict[tuple, list[tuple[Any, str]]] = {}
    for st in statuses:
        if st["status"] != "done":
            cell = st["cell"]
            seed = cell.values.get("seed", cell.config.get("seed"))
            absent.setdefault(_group_key(cell.values), []).append((seed, st["status"]))
    return absent


def _absent_text(absent: Sequence[tuple[Any, str]]) -> str:
    return ", ".join(f"seed {seed} {status}" for seed, status in absent)


def _mark_absent(rows: list[dict[str, Any]], statuses: Sequence[dict[str, Any]],
                 axes: list[str]) -> list[dict[str, Any]]:
    """Set each row's ``absent`` (its group's failed / invalid / missing cells) and return a
    placeholder row for every group that has no finished cell at all."""
    absent = _absent_cells(statuses)
    for r in rows:
        r["absent"] = [{"seed": s, "status": st} for s, st in absent.get(_group_key(r["group"]), [])]
    present = {_group_key(r["group"]) for r in rows}
    empty = []
    for st in statuses:
        key = _group_key(st["cell"].values)
        if key in absent and key not in present:
            present.add(key)
            empty.append({"group": {k: v for k, v in st["cell"].values.items() if k != "seed"},
                          "absent": [{"seed": s, "status": x} for s, x in absent[key]]})
    return empty


def _n_cell(r: dict[str, Any]) -> str:
    """The ``n seeds`` cell: ``n``, or ``n of N (seed s failed, ...)`` when cells are absent."""
    absent = r.get("absent") or []
    if not absent:
        return str(r["n"])
    return f"{r['n']} of {r['n'] + len(absent)} ({_absent_text([(a['seed'], a['status']) for a in absent])})"


def _problems_section(statuses: Sequence[dict[str, Any]], out: Path) -> list[str]:
    """The bench.md section listing every cell not done, with its log."""
    bad = [st for st in statuses if st["status"] != "done"]
    if not bad:
        return []
    table = [[st["cell"].slug, st["status"], "" if st.get("returncode") is None else st["returncode"],
              f"{st['launcher']} {st['job_id']}" if st.get("job_id") else "",
              (st.get("reason") or "").replace("|", "\\|")[:300],
              _relative(st.get("log"), out) or ""] for st in bad]
    return ["## Failed and missing cells", "",
            f"{len(bad)} of {len(statuses)} cells are not in the tables above (their rows show fewer "
            "seeds, marked in the *n seeds* column). *failed*: the cell's run exited with an error "
            "(tried again on the next `wsss bench`); *invalid*: its config is rejected, so it never "
            "ran; *missing*: not run yet or interrupted.", "",
            markdown_table(["cell", "status", "exit", "job", "reason", "log"], table), ""]


def cell_records(statuses: Sequence[dict[str, Any]], out: Path) -> list[dict[str, Any]]:
    """The cells as ``bench.json`` lists them: slug, axis values, status and, when not done, why."""
    return [{"slug": st["cell"].slug, "values": st["cell"].values, "status": st["status"],
             **({"reason": st.get("reason"), "returncode": st.get("returncode"),
                 "log": _relative(st.get("log"), out),
                 **({"launcher": st["launcher"], "job_id": st["job_id"]} if st.get("job_id") else {})}
                if st["status"] != "done" else {})}
            for st in statuses]


def write_tables(spec: dict[str, Any], records: list[dict[str, Any]], out: Path,
                 statuses: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """``bench.md``, ``bench.csv``, ``bench.json`` and ``bench.tex``.

    ``statuses`` (from :func:`cell_status`, one per cell with its ``cell``) mark the failed,
    invalid and missing cells in every table; without it every cell counts as done.
    """
    rows = aggregate(spec, records)
    labels = spec.get("labels") or {}
    axes = [k for k in (spec.get("matrix") or {}) if k != "seed"]
    titles = [labels.get(a, a) for a in axes]
    policies = [p for p in ("heldout", "oracle") if any(p in r.get("policies", {}) for r in rows)]
    policy_titles = {"heldout": "held-out thr. %", "oracle": "oracle thr. % (upper bound)"}
    show_ami = any(r.get("subtype_ami_mean") is not None for r in rows)
    header = [*titles, "split", "round", "cam method", "stage", "mIoU % (mean ± std)",
              *[policy_titles[p] for p in policies], *(["sub-type AMI"] if show_ami else []),
              "n seeds", "time / cell (s)", "peak RSS (MB)"]
    empty_groups = _mark_absent(rows, statuses, axes)
    table = []
    for r in rows:
        ami = r.get("subtype_ami_mean")
        table.append([*[_show(r["group"].get(a)) for a in axes], r["split"], r["round"], r["cam_method"],
                      _stage_cell(r), f"{pct(r['miou_mean'])} ± {pct(r['miou_std'])}",
                      *[pct(r["policies"][p]) if p in r.get("policies", {}) else "" for p in policies],
                      *([f"{ami:.3f}" if ami is not None else ""] if show_ami else []),
                      _n_cell(r), f"{r['seconds_mean']:.0f}", f"{r['peak_rss_mb_max']:.0f}"])
    for g in empty_groups:  # every cell of the group failed or is missing: a row says so
        text = _absent_text([(a["seed"], a["status"]) for a in g["absent"]])
        table.append([*[_show(g["group"].get(a)) for a in axes], "–", "–", "–", "–", f"no result ({text})",
                      *["" for _ in policies], *([""] if show_ami else []), f"0 of {len(g['absent'])}", "", ""])
    deltas = paired_deltas(rows)
    add_bootstrap(deltas)
    boot_title = f"{'/'.join(BOOTSTRAP_SPLITS)} Δ bootstrap {100 * (1 - ALPHA):.0f} % (images)"
    delta_table = [[*[_show(d["row"]["group"].get(a)) for a in axes], d["row"]["split"], d["row"]["round"],
                    d["row"]["cam_method"], _stage_cell(d["row"]), f"{100 * d['mean']:+.1f} ± {100 * d['std']:.1f}", d["n"],
                    _ci_cell(d), _p_cell(d["p_holm"]), d["separated"], _bootstrap_cell(d)] for d in deltas]
    proto = rows[0]["protocol"] if rows else {}
    seeds = sorted({s for r in rows for s in r["seeds"] if s is not None})
    md = [f"# Bench: {spec['name']}", "",
          f"Protocol: CAM seeds (cam method `cam` = head-weight CAM; others name the post-hoc "
          f"method; stage `cam` scores the CAMs, `refined:<refiner>` the refiner's pseudo masks, "
          f"`seg` the segmentation network trained on them, *seen* where it was trained on the "
          f"scored split), threshold policy `{proto.get('threshold_policy')}` (background score "
          f"{proto.get('threshold')}) for CAM rows{_mask_protocol(rows)}, ignore label {proto.get('ignore_index')}, mIoU over "
          f"{proto.get('mean_over')}; seeds {seeds}; std is the sample std over seeds. Paired "
          f"intervals against the baseline: over training seeds with the data fixed (t, Holm), "
          f"and over {'/'.join(BOOTSTRAP_SPLITS)} images with the trained models fixed (bootstrap)."
          + (" Sub-type AMI: mean over seeds of the adjusted mutual information between the round's "
             "sub-category clusters and the dataset's true sub-types (0 = unrelated, 1 = the same "
             "partition)." if show_ami else ""), "",
          markdown_table(header, table), "", *_problems_section(statuses, out)]
    quick = quick_look_line(spec.get("overrides"))
    if quick:
        md[1:1] = [f"**{quick}**", ""]
    if deltas:
        base = deltas[0]["baseline"]
        named = ", ".join(f"{t} {_show(base['group'].get(a))}" for t, a in zip(titles, axes))
        md += ["## Against the baseline", "",
               f"Baseline: the first row of each split ({named}, "
               f"round {base['round']}, cam method `{base['cam_method']}`; refined and segmentation "
               f"rows against the baseline's row of the same stage). Δ is paired by seed (same seed, "
               "same data order; mean ± sample std of the per-seed differences, fixed threshold). "
               "*Seed CI*: paired t-interval of the per-seed differences; it covers training "
               "seeds with the data fixed (the same images every seed), not another sample of "
               f"images. It is Holm-corrected over the rows of this table (family-wise "
               f"{100 * ALPHA:.0f} %): a row's level is 1 − {ALPHA}/m with m its Holm step "
               "multiplier (the level is shown beside the interval), so it excludes 0 exactly when the Holm-adjusted "
               f"p is below {ALPHA}. *Separated*: yes when that interval excludes 0, no when it "
               "holds 0, n/a with fewer than 2 paired seeds. "
               f"*Bootstrap*: paired per-image bootstrap of the mIoU difference on "
               f"{'/'.join(BOOTSTRAP_SPLITS)} ({BOOTSTRAP_RESAMPLES} resamples of the images, the "
               "same images for both methods, per-seed differences averaged; 2.5/97.5 "
               "percentiles, not corrected for multiplicity): how much the difference moves "
               "with another sample of images, the trained models fixed. n/a where the cells "
               "kept no per-image confusions (older runs); – on other splits. Rows equal to the "
               "baseline seed for seed (the shared round-0 classifier) are left out.", "",
               markdown_table([*titles, "split", "round", "cam method", "stage", "Δ mIoU points (paired)", "n seeds",
                               "seed CI, Holm (points)", "p (Holm)", "separated", boot_title],
                              delta_table), ""]
    io.write_text(out / "bench.md", "\n".join(md))
    buffer = _io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([*axes, "split", "round", "cam_method", "stage", "miou_mean", "miou_std", "n", "mious",
                     "threshold_policy", "threshold", "ignore_index", "seconds_mean", "peak_rss_mb_max",
                     "absent_cells"])

    def absent_csv(entries: Sequence[dict[str, Any]]) -> str:
        return " ".join(f"{a['seed']}:{a['status']}" for a in entries)

    for r in rows:
        writer.writerow([*[_show(r["group"].get(a)) for a in axes], r["split"], r["round"], r["cam_method"], r["stage"],
                         f"{r['miou_mean']:.6f}", f"{r['miou_std']:.6f}", r["n"],
                         " ".join(f"{m:.6f}" for m in r["mious"]), r["protocol"].get("threshold_policy"),
                         r["protocol"].get("threshold"), r["protocol"].get("ignore_index"),
                         f"{r['seconds_mean']:.2f}", f"{r['peak_rss_mb_max']:.1f}", absent_csv(r["absent"])])
    for g in empty_groups:
        writer.writerow([*[_show(g["group"].get(a)) for a in axes], "", "", "", "", "", "", 0, "", "", "", "", "", "",
                         absent_csv(g["absent"])])
    io.write_text(out / "bench.csv", buffer.getvalue())
    json_rows = [{**r, "confusions": [_relative(f, out) for f in r.get("confusions") or []]} for r in rows]
    io.write_json(out / "bench.json", {"name": spec["name"], "spec": spec, "rows": json_rows,
                                       "overrides": spec.get("overrides"),
                                       "cells": cell_records(statuses, out),
                                       "groups_without_result": empty_groups,
                                       "deltas": [{k: v for k, v in d.items() if k not in ("row", "baseline")}
                                                  | {"split": d["row"]["split"], "group": d["row"]["group"],
                                                     "round": d["row"]["round"], "stage": d["row"]["stage"],
                                                     "cam_method": d["row"]["cam_method"],
                                                     "alpha": ALPHA}
                                                  for d in deltas]})
    tex_note = f"% {quick}\n" if quick else ""
    io.write_text(out / "bench.tex", tex_note + latex_table(titles, axes, rows, empty_groups) + "\n"
                  + latex_delta_table(titles, axes, deltas))
    return {"rows": rows, "deltas": deltas, "out": str(out), "markdown": "\n".join(md),
            "cells": cell_records(statuses, out)}


def _stage_rank(stage: str) -> int:
    """Pipeline order of a row's stage: CAMs, refined masks, segmentation, anything else."""
    return 0 if stage == CAM else 1 if stage.startswith(REFINED) else 2 if stage == SEG else 3


def _stage_cell(row: dict[str, Any]) -> str:
    """A table cell for a row's stage: a segmentation scored on its own training split is *seen*."""
    return f"{row['stage']} (seen)" if row.get("protocol", {}).get("seen") else str(row["stage"])


def _mask_protocol(rows: Sequence[dict[str, Any]]) -> str:
    """The protocol of the refined and segmentation rows: ignore policy and whether a CRF ran."""
    masks = [r["protocol"] for r in rows if r.get("stage", CAM) != CAM]
    if not masks:
        return ""
    policies = sorted({str(p.get("ignore_policy")) for p in masks})
    crf = sorted({str(p.get("crf")) for p in masks if p.get("crf") is not None})
    return (f"; refined and segmentation rows: unsure pixels scored as `{'/'.join(policies)}` "
            f"(ignore policy){', crf: ' + '/'.join(crf) if crf else ''}")


def _esc(text: Any) -> str:
    return re.sub(r"([_%&#$])", r"\\\1", str(text))


def latex_table(titles: list[str], axes: list[str], rows: list[dict[str, Any]],
                empty_groups: Sequence[dict[str, Any]] = ()) -> str:
    """A booktabs table: axes, split, round, stage, mIoU mean ± std.

    A row over fewer seeds than the bench's (failed or missing cells) is marked with a dagger
    and a note under the table; a group with no finished cell gets a row that says so.
    """
    cols = "l" * (len(titles) + 4) + "r"
    lines = [r"\begin{tabular}{" + cols + "}", r"\toprule",
             " & ".join([*map(_esc, titles), "split", "round", "cam method", "stage", r"mIoU (\%)"]) + r" \\",
             r"\midrule"]
    marked = False
    for r in rows:
        dagger = r"^\dagger" if r.get("absent") else ""
        marked = marked or bool(dagger)
        cells = [*[_esc(_show(r["group"].get(a))) for a in axes], _esc(r["split"]), _esc(r["round"]),
                 _esc(r["cam_method"]), _esc(_stage_cell(r)), f"${100 * r['miou_mean']:.1f} \\pm {100 * r['miou_std']:.1f}{dagger}$"]
        lines.append(" & ".join(cells) + r" \\")
    for g in empty_groups:
        lines.append(" & ".join([*[_esc(_show(g["group"].get(a))) for a in axes], "--", "--", "--", "--",
                                 "no result"]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if marked or empty_groups:
        lines.append(r"\par\footnotesize $^\dagger$ fewer seeds than the bench's: failed or missing "
                     r"cells (bench.md lists them).")
    lines.append("")
    return "\n".join(lines)


def latex_delta_table(titles: list[str], axes: list[str], deltas: list[dict[str, Any]]) -> str:
    """A booktabs table of the paired differences to the baseline: Δ, the Holm-corrected seed
    t-interval and adjusted p, ``separated`` and the per-image bootstrap interval (points)."""
    if not deltas:
        return ""

    def interval(low: float, high: float) -> str:
        return f"$[{100 * low:+.1f}, {100 * high:+.1f}]$"

    cols = "l" * (len(titles) + 4) + "rrrrlr"
    lines = [r"% Seed CI: paired t over training seeds (data fixed), Holm-corrected across rows",
             r"% (row i at level 1 - alpha/m_i, m_i its Holm step multiplier; levels in bench.json);",
             f"% bootstrap: {BOOTSTRAP_RESAMPLES} resamples of the {'/'.join(BOOTSTRAP_SPLITS)} images "
             "(models fixed), 95 % percentile interval.",
             r"\begin{tabular}{" + cols + "}", r"\toprule",
             " & ".join([*map(_esc, titles), "split", "round", "cam method", "stage", r"$\Delta$ mIoU", "n",
                         r"seed CI (Holm)", r"$p_\mathrm{Holm}$", "separated",
                         r"bootstrap 95\,\%"]) + r" \\", r"\midrule"]
    for d in deltas:
        r = d["row"]
        boot = d.get("bootstrap")
        cells = [*[_esc(_show(r["group"].get(a))) for a in axes], _esc(r["split"]), _esc(r["round"]),
                 _esc(r["cam_method"]), _esc(_stage_cell(r)), f"${100 * d['mean']:+.1f} \\pm {100 * d['std']:.1f}$", str(d["n"]),
                 interval(*d["ci"]) if d["ci"] is not None else "n/a",
                 _esc(_p_cell(d["p_holm"])).replace("<", r"$<$"), d["separated"],
                 interval(boot["low"], boot["high"]) if boot is not None
                 else ("n/a" if d.get("bootstrap_split") else "--")]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(lines)
