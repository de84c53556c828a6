"""Report plots: matplotlib Figure + Agg canvas (no pyplot, no display, no global state)."""
from __future__ import annotations

import io as _io
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ... import io
from ...evaluation.tables import pct
from .images import png_uri

PLOTS_DIR = "plots"


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buffer = _io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def plot_per_class(final: Sequence[dict[str, Any]]) -> bytes:
    """Grouped bars: IoU (%) per class, one bar per final row (split)."""
    names = [c["class"] for c in final[0]["per_class"]]
    fig = _figure(max(6.0, 0.45 * len(names) * max(1, len(final)) + 1.5), 3.6)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(final)
    x = np.arange(len(names))
    for i, row in enumerate(final):
        values = [np.nan if c.get("iou") is None else 100 * c["iou"] for c in row["per_class"]]
        ax.bar(x + (i - (len(final) - 1) / 2) * width, values, width,
               label=f"{row['split']} (mIoU {pct(row['miou'])})")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=45 if len(names) > 8 else 0, ha="right" if len(names) > 8 else "center")
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="upper right", fontsize="small")
    ax.set_title("Per-class IoU of the final CAMs")
    return _png(fig)


def plot_rounds(series: dict[str, list[tuple[int, float]]]) -> bytes:
    """mIoU (%) per round, one line per split (and stage)."""
    fig = _figure(6.0, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    for label, points in series.items():
        points = sorted(points)
        ax.plot([r for r, _ in points], [100 * m for _, m in points], "o-", label=label)
    rounds = sorted({r for points in series.values() for r, _ in points})
    ax.set_xticks(rounds)
    ax.set_xlabel("round")
    ax.set_ylabel("mIoU (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    ax.set_title("mIoU per round")
    return _png(fig)


def plot_bench(labels: Sequence[str], means: Sequence[float], stds: Sequence[float], title: str) -> bytes:
    """Horizontal bars of mean ± std mIoU (%) per group (long group names stay readable)."""
    fig = _figure(7.0, max(2.2, 0.45 * len(labels) + 1.2))
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(len(labels))
    bars = ax.barh(y, [100 * m for m in means], xerr=[100 * s for s in stds], capsize=4, color="#4c72b0")
    ax.bar_label(bars, labels=[f"{100 * m:.1f} ± {100 * s:.1f}" for m, s in zip(means, stds)],
                 label_type="center", color="white", fontsize="small")
    ax.set_yticks(y)
    ax.set_yticklabels(labels)
    ax.invert_yaxis()   # first group on top, as in the table
    ax.set_xlabel("mIoU (%)")
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_title(title)
    return _png(fig)


class Plots:
    """Writes plots to ``<folder>/plots/<name>.png`` and hands back data URIs."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder / PLOTS_DIR

    def save(self, name: str, data: bytes) -> str:
        """Save a PNG atomically and return its data URI."""
        io.write_bytes(self.folder / f"{name}.png", data)
        return png_uri(data)

    def path(self, name: str) -> Path:
        """Where a plot named ``name`` goes (for writers that save files themselves)."""
        return self.folder / f"{name}.png"
