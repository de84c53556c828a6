"""``wsss report``: one self-contained HTML page for a run or a bench folder.

The page needs nothing but a browser: images are embedded as base64 ``data:`` URIs, the CSS is
inline and there is no JavaScript, so a report can be mailed, attached to an issue or opened
offline years later.  Every plot is also written as a PNG under ``<folder>/plots/``.

A **run** report holds the header (method, backbone, dataset, seed, device, wall time), the
results table with its protocol line, the per-class IoU of the final rows, the
mIoU-versus-threshold curves, the per-round progression and cluster statistics (SC-CAM), a grid
of examples (image | ground truth | CAM per class | pseudo mask) for the best, worst and random
images by per-image mIoU, the same images across rounds, and a sub-category gallery.

A **bench** report holds the aggregated table of ``bench.json`` and a bar chart of mean ± std
mIoU per group.

Thumbnails are at most :data:`THUMB` pixels; photos and heat maps are JPEG, masks are palette
PNG, which keeps a report of a full run to a few hundred kilobytes.

Modules, one concern each: ``loading`` (a run folder), ``scores`` (per-image mIoU, example
choice), ``images`` (masks, heat maps, thumbnails, data URIs), ``plots``, ``html`` (building
blocks and the page), ``run_sections`` and ``examples`` (the run page's sections),
``run_page`` and ``bench_page``; this module picks the page for a folder and writes it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ... import io
from ...errors import UserError
from .bench_page import bench_report
from .loading import Run
from .plots import Plots
from .run_page import run_report
from .scores import image_miou, pick_examples


def folder_kind(folder: Path) -> str:
    """``run`` or ``bench``; a one-line UserError for anything else."""
    folder = Path(folder)
    if not folder.exists():
        raise UserError(f"{folder}: folder does not exist")
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder (give a run or bench directory)")
    if (folder / "bench.json").is_file():
        return "bench"
    if (folder / "results.json").is_file():
        return "run"
    if (folder / "bench.yaml").is_file() or (folder / "cells").is_dir():
        raise UserError(f"{folder}: bench.json missing (the bench has not finished; rerun `wsss bench`)")
    if (folder / "manifest.json").is_file() or (folder / "config.yaml").is_file():
        raise UserError(f"{folder}: results.json missing (the run has not finished; "
                        "continue it with `wsss run ... --resume`)")
    raise UserError(f"{folder}: not a run or bench folder (no results.json or bench.json)")


def build_report(folder: Path, out: Optional[Path] = None, *, split: Optional[str] = None,
                 examples: int = 4, seed: int = 0) -> Path:
    """Write the HTML report of a run or bench folder; returns its path.

    ``out`` defaults to ``<folder>/report.html``; plots go to ``<folder>/plots/``.  ``split``
    picks the evaluation split of the examples (default ``val``, else the first final row),
    ``examples`` how many best / worst / random images, ``seed`` the random choices.
    """
    folder = Path(folder)
    kind = folder_kind(folder)
    if examples < 0:
        raise UserError(f"--examples must be >= 0, got {examples}")
    out = Path(out) if out is not None else folder / "report.html"
    if out.is_dir():
        out = out / "report.html"
    plots = Plots(folder)
    if kind == "bench":
        text = bench_report(folder, plots)
    else:
        text = run_report(Run.load(folder), plots, split=split, examples=examples, seed=seed)
    io.write_text(out, text)
    return out


__all__ = ["build_report", "folder_kind", "image_miou", "pick_examples"]
