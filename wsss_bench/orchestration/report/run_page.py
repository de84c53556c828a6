"""The run report page: its header and sections, each guarded so one failure stays local."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Optional

from ...errors import UserError
from ...evaluation import DEFAULT_THRESHOLD
from .examples import (ExampleRenderer, _split_for_examples, across_rounds_section, examples_section,
                       gallery_section)
from .html import esc, page
from .loading import Run
from .plots import Plots
from .run_sections import curves_section, per_class_section, results_section, rounds_section

log = logging.getLogger("wsss_bench.report")


def run_header(run: Run) -> str:
    """Method, backbone, dataset, seed, device, wall time (and provenance when known)."""
    res = run.results
    package = run.manifest.get("wsss_bench")
    items = [("method", res.get("method")), ("backbone", res.get("backbone")), ("dataset", res.get("dataset")),
             ("seed", res.get("seed")), ("device", res.get("device")),
             ("wall time", f"{float(res['wall_time_s']):.1f} s" if res.get("wall_time_s") is not None else "–"),
             ("train split", res.get("train_split")), ("evaluated splits", ", ".join(res.get("eval_splits") or [])),
             ("config digest", res.get("config_digest")), ("torch", res.get("torch")),
             ("package", package.get("version") if isinstance(package, dict) else None),
             ("run folder", run.path.resolve().name)]
    rows = "".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in items if v not in (None, ""))
    return f'<table class="meta">{rows}</table>'


def _guarded(title: str, build: Callable[[], Optional[str]]) -> Optional[str]:
    """Build a section that needs the dataset; a missing dataset or CAM file leaves a note.

    The tables and plots come from results.json alone and are worth having even when the
    images are gone (a run copied without its data), so such a failure must not sink the page.
    """
    try:
        return build()
    except UserError as exc:
        log.warning("report: %s skipped: %s", title, exc)
        return f'<p class="warn">{esc(title)} skipped: {esc(exc)}</p>'


def run_report(run: Run, plots: Plots, split: Optional[str] = None, examples: int = 4,
               seed: int = 0) -> str:
    """The HTML page of a run."""
    res = run.results
    if split is not None:
        _split_for_examples(run, split)   # a bad --split is the user's error, not a skipped section
    sections: list[tuple[str, str, str]] = [
        ("results", "Results", results_section(run)),
        ("per-class", "Per-class IoU", per_class_section(run, plots)),
        # A damaged curve file costs its section only, not the page.
        ("curves", "mIoU vs threshold", _guarded("threshold curves", lambda: curves_section(run, plots)) or ""),
    ]
    rounds = rounds_section(run, plots)
    if rounds:
        sections.append(("rounds", "Rounds", rounds))
    state: dict[str, Any] = {}

    def prepare() -> tuple[dict[str, Any], Any, ExampleRenderer]:
        if not state:
            row = _split_for_examples(run, split)
            dataset = run.open_eval_split(row["split"])
            threshold = float(row["protocol"].get("threshold", res.get("threshold", DEFAULT_THRESHOLD)))
            state.update(row=row, dataset=dataset, renderer=ExampleRenderer(dataset, threshold))
        return state["row"], state["dataset"], state["renderer"]

    sections.append(("examples", "Examples", _guarded(
        "examples", lambda: examples_section(run, *prepare(), examples, seed)) or ""))
    across = _guarded("rounds comparison", lambda: across_rounds_section(run, *prepare(), seed))
    if across:
        sections.append(("across-rounds", "Same images across rounds", across))
    gallery = _guarded("sub-category gallery", lambda: gallery_section(run, seed))
    if gallery:
        sections.append(("gallery", "Sub-category gallery", gallery))
    dataset = str(res.get("dataset", ""))
    # A dataset given by path shows its folder name in the title; the header has the full path.
    title = f"{res.get('method', 'run')} · {res.get('backbone', '')} · {Path(dataset).name if '/' in dataset else dataset}"
    return page(title, sections, run_header(run))
