"""Background-threshold policies: fixed, oracle (upper bound) and held-out selection.

CAM files carry only foreground maps; the background wins wherever the best foreground score is
not above a constant threshold (:func:`~wsss_bench.evaluation.miou.cams_to_labels`).  The
reported mIoU depends strongly on that constant, and many WSSS papers pick it by sweeping on the
ground truth of the very split they report (SEAM/MCTformer ``--curve``, CLIP-ES), which is an
upper bound rather than a weakly-supervised result.  Three policies are offered, to be reported
side by side (see the anchors survey, section 4.3, and the wsolevaluation protocol):

``fixed``
    a threshold set a priori (default 0.15, as IRN and SC-CAM);
``oracle``
    the threshold maximising mIoU on the evaluated split's own ground truth — an **upper bound**
    that uses pixel labels of the evaluated images and is labelled as such in every report;
``heldout``
    the threshold maximising mIoU on a separate, small labelled *selection* split, then applied
    unchanged to the evaluated split — the fair protocol.

All three come from one sweep of a split (:func:`~wsss_bench.evaluation.scoring.score_split`),
which computes the confusion matrix at every threshold of a grid in one pass over the images.  The default grid is 0.00, 0.01, ..., 0.95
(:data:`DEFAULT_GRID`): CAMs are normalised to [0, 1], and thresholds above 0.95 only remove
foreground.  Ties between thresholds of equal mIoU go to the lowest threshold.
"""
from __future__ import annotations

import io as _io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from .. import io
from ..data.voc import IGNORE_INDEX, VOCDataset
from ..errors import ConfigError, UserError
from . import DEFAULT_THRESHOLD
from .evaluate import EvalResult
from .miou import class_table, scores_from_confusion
from .scoring import SplitScores, miou_curve, score_split  # noqa: F401 (miou_curve: public here)

Curve = list[tuple[float, float]]
"""An mIoU-versus-threshold curve: ``(threshold, miou)`` pairs sorted by threshold."""

POLICIES = ("fixed", "oracle", "heldout")


def threshold_grid(start: float = 0.0, stop: float = 0.95, step: float = 0.01) -> list[float]:
    """Evenly spaced thresholds from ``start`` to ``stop`` inclusive.

    Values are rounded to 10 decimals so that e.g. the 16th point is exactly ``0.15`` (the same
    float a user types), not ``0.15000000000000002`` from repeated addition.
    """
    if step <= 0:
        raise ConfigError(f"threshold grid step must be positive, got {step}")
    if stop < start:
        raise ConfigError(f"threshold grid stop {stop} is below start {start}")
    count = int(math.floor((stop - start) / step + 1e-9)) + 1
    return [round(start + i * step, 10) for i in range(count)]


DEFAULT_GRID: tuple[float, ...] = tuple(threshold_grid())
"""0.00, 0.01, ..., 0.95 (96 thresholds)."""


# --------------------------------------------------------------------------------------------
# One-pass sweep
# --------------------------------------------------------------------------------------------

def sweep_confusions(cam_dir: Path, dataset: VOCDataset, thresholds: Sequence[float],
                     device: torch.device | str = "cpu", show_progress: bool = False) -> np.ndarray:
    """Confusion matrices ``[T, C+1, C+1]`` (rows = ground truth) at every background threshold.

    Equal, entry for entry, to ``evaluate_cams(cam_dir, dataset, t).confusion`` for each ``t`` in
    ``thresholds`` (any order, duplicates allowed), but each CAM file and mask is read once
    (:func:`~wsss_bench.evaluation.scoring.score_split`, counted by
    :class:`~wsss_bench.evaluation.miou.CamConfusion`).
    """
    return score_split(cam_dir, dataset, thresholds, device=device, show_progress=show_progress,
                       label="sweep").confusions


def best_threshold(curve: Curve) -> float:
    """The threshold of highest mIoU (the lowest one on ties); NaN points are skipped."""
    finite = [(t, m) for t, m in sorted(curve) if m == m]
    if not finite:
        raise UserError("cannot select a threshold: mIoU is undefined at every threshold "
                        "(no ground-truth class present in the split)")
    top = max(m for _, m in finite)
    return next(t for t, m in finite if m == top)


def robustness_auc(curve: Curve) -> float:
    """Area under the mIoU-versus-threshold curve divided by the threshold range.

    The mean mIoU over the range (trapezoid rule), hence in [0, 1]: 1 means the CAMs score
    perfectly whatever the threshold, and a method whose mIoU collapses away from a narrow sweet
    spot scores low even when its oracle mIoU is high.  NaN points are dropped; a single point
    gives its own mIoU.
    """
    points = sorted((float(t), float(m)) for t, m in curve if m == m)
    if not points:
        raise ValueError("robustness_auc needs at least one point with a defined mIoU")
    ts = np.array([p[0] for p in points])
    ms = np.array([p[1] for p in points])
    span = ts[-1] - ts[0]
    if span <= 0:
        return float(ms.mean())
    area = float(np.sum((ts[1:] - ts[:-1]) * (ms[1:] + ms[:-1]) / 2.0))
    return area / float(span)


# --------------------------------------------------------------------------------------------
# Policies
# --------------------------------------------------------------------------------------------

@dataclass
class ThresholdReport:
    """The scores of one split under one threshold policy, with the curve behind the choice.

    ``curve`` is the evaluated split's mIoU over the grid (for plots and :attr:`auc`);
    ``selection_curve`` is the curve on the selection split the ``heldout`` threshold was
    chosen on.  ``upper_bound`` is True for ``oracle``: its threshold saw the evaluated split's
    ground truth, so its mIoU is not a weakly-supervised result.
    """

    policy: str
    split: str
    threshold: float
    miou: float
    per_class: list[dict[str, Any]]
    confusion: np.ndarray = field(repr=False)
    curve: Curve = field(repr=False)
    auc: float
    num_images: int
    stage: str = "cam"
    selection_split: Optional[str] = None
    selection_curve: Optional[Curve] = field(default=None, repr=False)
    selection_miou: Optional[float] = None
    upper_bound: bool = False

    @property
    def label(self) -> str:
        """A short legend label, e.g. ``oracle 0.23 (upper bound)``."""
        if self.policy == "oracle":
            return f"oracle {self.threshold:.2f} (upper bound, GT of {self.split})"
        if self.policy == "heldout":
            return f"heldout {self.threshold:.2f} (selected on {self.selection_split})"
        return f"fixed {self.threshold:.2f}"

    @property
    def protocol(self) -> dict[str, Any]:
        """How the number was measured, in the same keys as :class:`EvalResult` plus extras."""
        protocol: dict[str, Any] = {
            "split": self.split, "stage": "cam", "cam_method": self.stage, "threshold_policy": self.policy,
            "threshold": self.threshold, "ignore_index": IGNORE_INDEX,
            "mean_over": "classes present in ground truth", "upper_bound": self.upper_bound,
        }
        if self.policy == "oracle":
            protocol["note"] = ("upper bound: threshold chosen on the ground truth of the evaluated "
                                "split; not a weakly-supervised result")
        if self.selection_split is not None:
            protocol["selection_split"] = self.selection_split
        return protocol

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (confusion as nested lists, curves as ``[t, miou]`` pairs)."""
        return {
            "policy": self.policy, "label": self.label, "split": self.split,
            "threshold": self.threshold, "miou": self.miou, "upper_bound": self.upper_bound,
            "robustness_auc": self.auc, "num_images": self.num_images,
            "selection_split": self.selection_split, "selection_miou": self.selection_miou,
            "protocol": self.protocol, "per_class": self.per_class,
            "curve": [list(p) for p in self.curve],
            "selection_curve": None if self.selection_curve is None else [list(p) for p in self.selection_curve],
            "confusion": self.confusion.tolist(),
        }

    def to_eval_result(self) -> EvalResult:
        """The same scores as an :class:`EvalResult`, for the existing result tables."""
        return EvalResult(self.split, self.threshold, self.miou, self.per_class, self.confusion,
                          self.num_images, self.protocol)


def _sweep(cam_dir: Path, dataset: VOCDataset, grid: Sequence[float], extra: Sequence[float],
           device: torch.device | str, show_progress: bool) -> SplitScores:
    thresholds = list(dict.fromkeys([*grid, *extra]))   # dedupe, keep order
    return score_split(cam_dir, dataset, thresholds, device=device, show_progress=show_progress,
                       label="sweep")


def _report(policy: str, sweep: SplitScores, grid: Sequence[float], threshold: float, stage: str,
            selection: Optional[SplitScores] = None) -> ThresholdReport:
    confusion = sweep.confusion(threshold)
    scores = scores_from_confusion(confusion)
    curve = sweep.curve(grid)
    return ThresholdReport(
        policy=policy, split=sweep.split, threshold=float(threshold),
        miou=float(scores["miou"]), per_class=class_table(sweep.dataset.class_names, scores),
        confusion=confusion, curve=curve, auc=_auc_or_nan(curve),
        num_images=len(sweep.dataset.ids), stage=stage,
        selection_split=None if selection is None else selection.split,
        selection_curve=None if selection is None else selection.curve(grid),
        selection_miou=None if selection is None else selection.miou(threshold),
        upper_bound=policy == "oracle",
    )


def policy_reports(main: SplitScores, *, threshold: float = DEFAULT_THRESHOLD,
                   grid: Optional[Sequence[float]] = None, selection: Optional[SplitScores] = None,
                   stage: str = "cam") -> dict[str, ThresholdReport]:
    """``fixed`` and ``oracle`` reports of a scored split, plus ``heldout`` chosen on the scored
    ``selection`` split; both sweeps must hold the grid (and ``main`` the fixed threshold).

    No file is read: the sweeps of :func:`~wsss_bench.evaluation.scoring.score_split` are
    reused, so a split serves as another's selection split at no cost.
    """
    values = _check_grid(grid)
    _check_fixed(threshold)
    curve = main.curve(values)
    reports = {"fixed": _report("fixed", main, values, threshold, stage),
               "oracle": _report("oracle", main, values, best_threshold(curve), stage)}
    if selection is not None:
        chosen = best_threshold(selection.curve(values))
        reports["heldout"] = _report("heldout", main, values, chosen, stage, selection)
    return reports


def _auc_or_nan(curve: Curve) -> float:
    # A split with no ground-truth class has no defined mIoU anywhere; report NaN, not a crash.
    return robustness_auc(curve) if any(m == m for _, m in curve) else float("nan")


def _check_grid(grid: Optional[Sequence[float]]) -> list[float]:
    values = list(DEFAULT_GRID if grid is None else [float(t) for t in grid])
    if not values:
        raise ConfigError("the threshold grid is empty")
    if any(not (0.0 <= t <= 1.0) for t in values):
        raise ConfigError(f"grid thresholds must lie in [0, 1], got {min(values)}..{max(values)}")
    return sorted(dict.fromkeys(values))


def _check_selection(dataset: VOCDataset, selection_dataset: Optional[VOCDataset],
                     allow_overlap: bool) -> VOCDataset:
    if selection_dataset is None:
        raise ConfigError("policy 'heldout' needs a labelled selection split (selection_dataset)")
    if selection_dataset.num_classes != dataset.num_classes:
        raise ConfigError(f"selection split {selection_dataset.split!r} has "
                          f"{selection_dataset.num_classes} classes, evaluated split "
                          f"{dataset.split!r} has {dataset.num_classes}")
    # Overlapping images would let the evaluated split's ground truth leak into the choice,
    # turning 'heldout' into a partial oracle.  Ids only name the same image within one tree.
    if not allow_overlap and Path(selection_dataset.root).resolve() == Path(dataset.root).resolve():
        shared = sorted(set(selection_dataset.ids) & set(dataset.ids))
        if shared:
            raise ConfigError(
                f"selection split {selection_dataset.split!r} shares {len(shared)} images with the "
                f"evaluated split {dataset.split!r} (first: {shared[0]}); a held-out threshold must "
                "be chosen on other images (use policy 'oracle' for the upper bound, or "
                "allow_overlap=True to override)")
    return selection_dataset


def compare_policies(cam_dir: Path, dataset: VOCDataset, *, threshold: float = DEFAULT_THRESHOLD,
                     grid: Optional[Sequence[float]] = None,
                     selection_dataset: Optional[VOCDataset] = None,
                     selection_cam_dir: Optional[Path] = None, device: torch.device | str = "cpu",
                     allow_overlap: bool = False, stage: str = "cam",
                     show_progress: bool = False) -> dict[str, ThresholdReport]:
    """All policies side by side: ``fixed`` and ``oracle``, plus ``heldout`` when a selection
    split is given.  One pass over the evaluated split and one over the selection split.
    """
    values = _check_grid(grid)
    _check_fixed(threshold)
    cam_dir = Path(cam_dir)
    sel = None
    if selection_dataset is not None:
        sel_ds = _check_selection(dataset, selection_dataset, allow_overlap)
        sel = _sweep(Path(selection_cam_dir or cam_dir), sel_ds, values, [], device, show_progress)
    main = _sweep(cam_dir, dataset, values, [threshold], device, show_progress)
    return policy_reports(main, threshold=threshold, grid=values, selection=sel, stage=stage)


def _check_fixed(threshold: float) -> None:
    if not (0.0 <= float(threshold) <= 1.0):
        raise ConfigError(f"threshold must lie in [0, 1], got {threshold}")


def apply_policy(policy: str, cam_dir: Path, dataset: VOCDataset, *,
                 threshold: float = DEFAULT_THRESHOLD, grid: Optional[Sequence[float]] = None,
                 selection_dataset: Optional[VOCDataset] = None,
                 selection_cam_dir: Optional[Path] = None, device: torch.device | str = "cpu",
                 allow_overlap: bool = False, stage: str = "cam",
                 show_progress: bool = False) -> ThresholdReport:
    """Score ``dataset``'s CAMs in ``cam_dir`` under one threshold policy.

    * ``fixed``: at ``threshold``;
    * ``oracle``: at the grid threshold of best mIoU on ``dataset`` itself (upper bound);
    * ``heldout``: at the grid threshold of best mIoU on ``selection_dataset`` (CAMs read from
      ``selection_cam_dir``, default ``cam_dir``), which must share no image with ``dataset``
      unless ``allow_overlap``.

    ``grid`` defaults to :data:`DEFAULT_GRID`.  Every report carries the evaluated split's curve
    over the grid, so all policies also give a :func:`robustness_auc`.
    """
    if policy not in POLICIES:
        raise ConfigError(f"unknown threshold policy {policy!r}; choose one of {', '.join(POLICIES)}")
    values = _check_grid(grid)
    cam_dir = Path(cam_dir)
    if policy == "fixed":
        _check_fixed(threshold)
        main = _sweep(cam_dir, dataset, values, [threshold], device, show_progress)
        return _report("fixed", main, values, threshold, stage)
    if policy == "oracle":
        main = _sweep(cam_dir, dataset, values, [], device, show_progress)
        return _report("oracle", main, values, best_threshold(main.curve(values)), stage)
    sel_ds = _check_selection(dataset, selection_dataset, allow_overlap)
    # Choose on the selection split first: the evaluated split is only read afterwards.
    sel = _sweep(Path(selection_cam_dir or cam_dir), sel_ds, values, [], device, show_progress)
    chosen = best_threshold(sel.curve(values))
    main = _sweep(cam_dir, dataset, values, [], device, show_progress)
    return _report("heldout", main, values, chosen, stage, sel)


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

def save_curve(path_json: Path, curve: Curve, meta: Optional[Mapping[str, Any]] = None) -> None:
    """Atomically write a curve as JSON: ``{"curve": [[t, miou], ...], "robustness_auc",
    "best_threshold", **meta}`` (undefined mIoU written as null)."""
    defined = any(m == m for _, m in curve)
    payload: dict[str, Any] = dict(meta or {})
    payload.update({
        "curve": [[float(t), float(m)] for t, m in sorted(curve)],
        "robustness_auc": robustness_auc(curve) if defined else None,
        "best_threshold": best_threshold(curve) if defined else None,
    })
    io.write_json(Path(path_json), payload)


def load_curve(path_json: Path) -> Curve:
    """Read back a curve written by :func:`save_curve` (null mIoU becomes NaN)."""
    import json

    try:
        raw = json.loads(Path(path_json).read_text())
        return [(float(t), float("nan") if m is None else float(m)) for t, m in raw["curve"]]
    except FileNotFoundError:
        raise UserError(f"{path_json}: curve file not found") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path_json}: not a curve file ({exc})") from None


def plot_curves(path_png: Path, curves: Mapping[str, Curve],
                marks: Optional[Mapping[str, float]] = None, title: Optional[str] = None) -> None:
    """Plot mIoU-versus-threshold curves to a PNG, written atomically.

    ``marks`` maps a legend label to a threshold drawn as a dashed vertical line (e.g. the
    fixed, oracle and held-out choices); a mark whose label is also a curve's label takes that
    curve's colour and gets a dot at the curve's value.  Uses the Agg canvas directly, without
    pyplot, so no display or global backend state is touched.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install matplotlib") from None

    fig = Figure(figsize=(6.0, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colours: dict[str, Any] = {}
    for name, curve in curves.items():
        pts = sorted(curve)
        (line,) = ax.plot([t for t, _ in pts], [100 * m for _, m in pts], label=name)
        colours[name] = line.get_color()
    for name, t in (marks or {}).items():
        colour = colours.get(name, "0.4")
        ax.axvline(t, color=colour, linestyle="--", linewidth=1,
                   label=None if name in curves else f"{name} ({t:.2f})")
        if name in curves:
            value = dict(curves[name]).get(t)
            if value is not None and value == value:
                ax.plot([t], [100 * value], "o", color=colour)
    ax.set_xlabel("background threshold")
    ax.set_ylabel("mIoU (%)")
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title)
    if curves or marks:
        ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    buffer = _io.BytesIO()
    fig.savefig(buffer, format="png")
    io.write_bytes(Path(path_png), buffer.getvalue())
