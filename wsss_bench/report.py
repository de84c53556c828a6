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
"""
from __future__ import annotations

import base64
import html
import io as _io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
from PIL import Image

from . import io
from .errors import DataError, UserError
from .evaluation import DEFAULT_THRESHOLD
from .evaluation.tables import pct

log = logging.getLogger(__name__)

THUMB = 128           # longest side of example thumbnails (pixels)
GALLERY_THUMB = 96    # gallery thumbnails are smaller: a gallery can hold ~100 of them
JPEG_QUALITY = 80
IGNORE_INDEX = 255
PLOTS_DIR = "plots"


# --------------------------------------------------------------------------------------------
# Images: palette, heat maps, thumbnails, data URIs
# --------------------------------------------------------------------------------------------

def voc_palette() -> np.ndarray:
    """The PASCAL VOC colour map as uint8 ``[256, 3]`` (index 255, "ignore", is cream)."""
    palette = np.zeros((256, 3), np.uint8)
    for index in range(256):
        value, r, g, b = index, 0, 0, 0
        # VOC spreads the bits of the class index over the high bits of the three channels.
        for shift in range(7, -1, -1):
            r |= ((value >> 0) & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        palette[index] = (r, g, b)
    return palette


_PALETTE = voc_palette()


def colour_hex(index: int) -> str:
    """``#rrggbb`` of a class index in the VOC palette."""
    r, g, b = (int(v) for v in _PALETTE[index])
    return f"#{r:02x}{g:02x}{b:02x}"


def mask_image(mask: np.ndarray) -> Image.Image:
    """A label map as a palette ('P') image with VOC colours, so it stays a small PNG."""
    image = Image.fromarray(np.asarray(mask, np.uint8), mode="P")
    image.putpalette(_PALETTE.reshape(-1).tolist())
    return image


def heatmap_overlay(image: Image.Image, cam: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """A CAM in [0, 1] drawn with the jet colour map over the image."""
    from matplotlib import colormaps  # the registry only; pyplot's global state is not touched

    colours = colormaps["jet"](np.clip(cam, 0.0, 1.0))[..., :3] * 255.0
    base = np.asarray(image.convert("RGB"), np.float32)
    if base.shape[:2] != cam.shape:
        base = np.asarray(image.convert("RGB").resize(cam.shape[::-1], Image.BILINEAR), np.float32)
    blended = (1.0 - alpha) * base + alpha * colours
    return Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8), mode="RGB")


def thumbnail(image: Image.Image, size: int = THUMB, nearest: bool = False) -> Image.Image:
    """A copy no larger than ``size`` on its longest side (masks resized without blending)."""
    copy = image.copy()
    copy.thumbnail((size, size), Image.NEAREST if nearest else Image.BILINEAR)
    return copy


def data_uri(image: Image.Image, kind: str = "jpeg") -> str:
    """An image encoded as a ``data:`` URI: JPEG for photos, PNG for masks and plots."""
    buffer = _io.BytesIO()
    if kind == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=True)
        mime = "image/jpeg"
    else:
        image.save(buffer, format="PNG", optimize=True)
        mime = "image/png"
    return f"data:{mime};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def png_uri(data: bytes) -> str:
    """PNG bytes (a saved plot) as a ``data:`` URI, re-encoded with a 256-colour palette.

    Matplotlib writes 32-bit RGBA; a plot has few distinct colours, so an adaptive palette
    looks the same at a quarter of the size (the PNG under ``plots/`` keeps full colour).
    """
    with Image.open(_io.BytesIO(data)) as image:
        image.load()
        buffer = _io.BytesIO()
        image.convert("RGB").quantize(colors=256).save(buffer, format="PNG", optimize=True)
    smaller = buffer.getvalue() if buffer.tell() < len(data) else data
    return "data:image/png;base64," + base64.b64encode(smaller).decode("ascii")


# --------------------------------------------------------------------------------------------
# Per-image scores
# --------------------------------------------------------------------------------------------

def pseudo_mask(keys: np.ndarray, cams: np.ndarray, threshold: float) -> np.ndarray:
    """The label map of a CAM file at a constant background score (as ``wsss eval``)."""
    import torch

    from .evaluation.miou import cams_to_labels

    labels = cams_to_labels(keys, torch.from_numpy(np.ascontiguousarray(cams, np.float32)), threshold)
    return labels.numpy().astype(np.uint8)


def image_miou(prediction: np.ndarray, truth: np.ndarray, num_classes: int) -> float:
    """mIoU of one image: mean IoU over the classes present in its ground truth (255 ignored).

    The same convention as the split-level number, so a ranked image's score reads the same
    way as the table; NaN when the image has no labelled pixel.
    """
    n = num_classes + 1
    valid = truth != IGNORE_INDEX
    gt = truth[valid].astype(np.int64)
    pred = np.minimum(prediction[valid].astype(np.int64), n - 1)
    if gt.size == 0:
        return float("nan")
    confusion = np.bincount(gt * n + pred, minlength=n * n).reshape(n, n)
    tp = np.diag(confusion).astype(np.float64)
    gt_count = confusion.sum(axis=1)
    union = gt_count + confusion.sum(axis=0) - tp
    present = gt_count > 0
    return float(np.mean(tp[present] / union[present]))


@dataclass
class ImageScore:
    """What the examples grid needs of one image of one CAM folder."""

    image_id: str
    miou: float


def score_images(cam_dir: Path, dataset: Any, threshold: float) -> list[ImageScore]:
    """Per-image mIoU of every image of ``dataset`` that has a CAM file in ``cam_dir``."""
    from .evaluation.camfiles import read_cam

    scores = []
    for image_id in dataset.ids:
        path = cam_dir / f"{image_id}.npz"
        if not path.is_file():   # a run limited by max_images has CAMs for a prefix only
            continue
        truth = dataset.load_mask(image_id)
        keys, cams = read_cam(path, dataset.num_classes, truth.shape)
        scores.append(ImageScore(image_id, image_miou(pseudo_mask(keys, cams, threshold), truth,
                                                      dataset.num_classes)))
    return scores


def pick_examples(scores: Sequence[ImageScore], count: int, seed: int
                  ) -> list[tuple[str, ImageScore]]:
    """The ``count`` best, ``count`` worst and ``count`` random images, without repeats."""
    ranked = sorted((s for s in scores if s.miou == s.miou), key=lambda s: (-s.miou, s.image_id))
    best = ranked[:count]
    rest = ranked[len(best):]
    worst = list(reversed(rest[-count:])) if count else []
    taken = {s.image_id for s in best + worst}
    pool = [s for s in ranked if s.image_id not in taken]
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(pool), size=min(count, len(pool)), replace=False).tolist()) if pool else []
    return ([("best", s) for s in best] + [("worst", s) for s in worst]
            + [("random", pool[i]) for i in chosen])


# --------------------------------------------------------------------------------------------
# Plots (matplotlib Figure + Agg canvas: no pyplot, no display, no global state)
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# HTML building blocks
# --------------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5em auto;max-width:1150px;
 padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.8em}
h3{margin-bottom:.3em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.25em .6em;vertical-align:middle}
th{background:#f2f2f2;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.final td{font-weight:600;background:#f7fbff}
.meta td:first-child{font-weight:600;background:#f7f7f7}
.note{color:#555;font-size:.9em}.warn{color:#8a4b00;background:#fff6e5;padding:.4em .7em;border-radius:4px}
.plot{max-width:100%;height:auto;border:1px solid #eee}.plot.half{max-width:49%}
.cluster{border:1px solid #ddd;border-radius:4px;padding:4px;background:#fafafa}
.cluster .caption{font-size:.75em;color:#444;margin-bottom:3px}.cluster img{margin-right:3px}
.row{display:flex;flex-wrap:wrap;gap:6px;align-items:flex-start;margin:.3em 0 .8em}
figure{margin:0;text-align:center}figcaption{font-size:.75em;color:#444;max-width:140px;overflow-wrap:anywhere}
img.thumb{height:104px;width:auto;border:1px solid #ddd}img.thumb.small{height:72px}
img.mask{image-rendering:pixelated}
.label{min-width:9em;font-size:.85em;align-self:center}
.swatch{display:inline-block;width:.9em;height:.9em;border:1px solid #999;margin:0 .25em 0 .8em;vertical-align:-.1em}
nav a{margin-right:1em}
table.rounds td{border:none;border-bottom:1px solid #eee;padding:2px 6px}table.rounds .row{margin:0}
"""


def esc(value: Any) -> str:
    """HTML-escaped text of any value."""
    return html.escape(str(value), quote=True)


def html_table(header: Sequence[str], rows: Iterable[Sequence[Any]], table_id: Optional[str] = None,
               numeric: Optional[Callable[[int], bool]] = None,
               row_classes: Optional[Sequence[str]] = None) -> str:
    """A table; cells are escaped, ``numeric(column)`` right-aligns number columns."""
    ident = f' id="{esc(table_id)}"' if table_id else ""
    parts = [f"<table{ident}><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr></thead><tbody>"]
    for n, row in enumerate(rows):
        cls = f' class="{esc(row_classes[n])}"' if row_classes and row_classes[n] else ""
        cells = []
        for i, cell in enumerate(row):
            attr = ' class="num"' if numeric and numeric(i) else ""
            cells.append(f"<td{attr}>{esc(cell)}</td>")
        parts.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    parts.append("</tbody></table>")
    return "".join(parts)


def img_tag(uri: str, alt: str, css: str = "thumb", title: Optional[str] = None) -> str:
    """An ``<img>`` with a data URI (``alt`` doubles as the tooltip unless ``title`` is given)."""
    return f'<img class="{css}" src="{uri}" alt="{esc(alt)}" title="{esc(title or alt)}">'


def figure(uri: str, caption: str, css: str = "thumb") -> str:
    """A captioned thumbnail."""
    return f"<figure>{img_tag(uri, caption, css)}<figcaption>{esc(caption)}</figcaption></figure>"


def page(title: str, sections: Sequence[tuple[str, str, str]], header: str) -> str:
    """The whole document: title, header block, a table of contents and the sections."""
    nav = " ".join(f'<a href="#{esc(anchor)}">{esc(name)}</a>' for anchor, name, _ in sections)
    body = "".join(f'<section id="{esc(anchor)}"><h2>{esc(name)}</h2>{content}</section>'
                   for anchor, name, content in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head>"
            f"<body><h1>{esc(title)}</h1>{header}<nav>{nav}</nav>{body}"
            f'<p class="note">Generated by <code>wsss report</code>; self-contained (no network, '
            f"no scripts).</p></body></html>\n")


# --------------------------------------------------------------------------------------------
# Loading a run
# --------------------------------------------------------------------------------------------

def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None


@dataclass
class Run:
    """A finished run directory, its results, config and manifest."""

    path: Path
    results: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> "Run":
        """Read ``results.json`` (required), ``config.yaml`` and ``manifest.json`` (optional)."""
        results = _read_json(path / "results.json")
        if not isinstance(results, dict) or not isinstance(results.get("rows"), list):
            raise UserError(f"{path / 'results.json'}: not a results file (no 'rows' list)")
        for n, row in enumerate(results["rows"]):
            missing = [k for k in ("split", "miou", "protocol", "per_class") if k not in row]
            if missing:
                raise UserError(f"{path / 'results.json'}: row {n} lacks {', '.join(missing)}")
        config: dict[str, Any] = {}
        if (path / "config.yaml").is_file():
            import yaml

            try:
                config = yaml.safe_load((path / "config.yaml").read_text()) or {}
            except yaml.YAMLError as exc:
                raise UserError(f"{path / 'config.yaml'}: invalid YAML ({exc})") from None
        manifest = _read_json(path / "manifest.json") if (path / "manifest.json").is_file() else {}
        return cls(path, results, config if isinstance(config, dict) else {},
                   manifest if isinstance(manifest, dict) else {})

    @property
    def rows(self) -> list[dict[str, Any]]:
        """All result rows."""
        return self.results["rows"]

    @property
    def final(self) -> list[dict[str, Any]]:
        """The rows of the final CAMs (``final`` in results.json, else the last row per split)."""
        final = self.results.get("final") or []
        if final:
            return final
        last: dict[str, dict[str, Any]] = {}
        for row in self.rows:
            last[row["split"]] = row
        return list(last.values())

    @property
    def class_names(self) -> list[str]:
        """Foreground class names (the per-class rows minus background)."""
        names = self.manifest.get("dataset", {}).get("class_names")
        if names:
            return list(names)
        return [c["class"] for c in self.rows[0]["per_class"][1:]] if self.rows else []

    def data_root(self, role: str) -> Path:
        """The VOC-layout root a split was read from (``role`` is ``train`` or ``eval:<split>``).

        The manifest's resolved root first; else the configuration is resolved again (e.g. a
        run copied from another machine: the synthetic dataset is regenerated in the cache).
        """
        entry = self.manifest.get("dataset", {}).get(role) or {}
        root = entry.get("root")
        if root and Path(root).is_dir():
            return Path(root)
        if not self.config:
            raise DataError(f"{self.path}: cannot find the dataset (no manifest.json or config.yaml)")
        from .config import validate_config
        from .runner import resolve_data_root

        found, _ = resolve_data_root(validate_config(dict(self.config)))
        return Path(found)

    def open_eval_split(self, split: str) -> Any:
        """The evaluation split, with masks, as the run read it."""
        from .data.voc import open_split

        labels = (self.config.get("dataset") or {}).get("labels_file")
        return open_split(self.data_root(f"eval:{split}"), split, Path(labels) if labels else None,
                          self.class_names or None)

    def train_ids(self) -> list[str]:
        """The training ids in the order of the sub-category arrays (first ``max_images``)."""
        from .data.voc import read_split

        dataset_cfg = self.config.get("dataset") or {}
        entry = self.manifest.get("dataset", {}).get("train") or {}
        split = entry.get("split") or dataset_cfg.get("train_split") or self.results.get("train_split") or "train_aug"
        ids = read_split(self.data_root("train"), split)
        limit = entry.get("images") or dataset_cfg.get("max_images")
        return ids[:limit] if limit else ids


# --------------------------------------------------------------------------------------------
# Run sections
# --------------------------------------------------------------------------------------------

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


def _policy_cell(row: dict[str, Any], name: str) -> str:
    found = (row.get("policies") or {}).get(name)
    return "–" if not found else f"{pct(found['miou'])} (t={found['threshold']:.2f})"


def results_section(run: Run) -> str:
    """The results table (every row) with its protocol line."""
    rows = run.rows
    has_round = any("round" in r for r in rows)
    has_head = any(r.get("head", "parent") != "parent" for r in rows)
    policies = [p for p in ("heldout", "oracle") if any(p in (r.get("policies") or {}) for r in rows)]
    titles = {"heldout": "held-out thr. mIoU (%)", "oracle": "oracle thr. mIoU (%, upper bound)"}
    threshold = run.results.get("threshold", DEFAULT_THRESHOLD)
    header = ["split", *(["round"] if has_round else []), *(["head"] if has_head else []), "stage",
              f"fixed mIoU (%) @ {threshold}", *[titles[p] for p in policies], "images"]
    final_ids = {(r.get("tag"), r.get("head"), r["split"]) for r in run.final}
    body, classes = [], []
    for r in rows:
        body.append([r["split"], *([r.get("round", "")] if has_round else []),
                     *([r.get("head", "parent")] if has_head else []), r["protocol"].get("stage", ""),
                     pct(r["miou"]), *[_policy_cell(r, p) for p in policies], r.get("num_images", "")])
        is_final = (r.get("tag"), r.get("head"), r["split"]) in final_ids
        classes.append("final" if is_final else "")
    first_number = header.index(f"fixed mIoU (%) @ {threshold}")
    table = html_table(header, body, "results", numeric=lambda i: i >= first_number, row_classes=classes)
    from .evaluation.tables import protocol_line

    proto = protocol_line(rows[-1]).replace("`", "") if rows else ""
    notes = [f"<p><b>Protocol:</b> {esc(proto)}. Bold rows are the final CAMs.</p>"]
    if "heldout" in policies:
        notes.append('<p class="note"><b>held-out</b>: the background threshold is chosen on another '
                     "labelled split, then applied (the fair protocol).</p>")
    if "oracle" in policies:
        notes.append('<p class="note"><b>oracle</b>: best threshold on the evaluated split\'s own '
                     "ground truth: an upper bound, not a weakly-supervised result.</p>")
    return table + "".join(notes)


def per_class_section(run: Run, plots: Plots) -> str:
    """Bar chart and table of the per-class IoU of the final rows."""
    final = [r for r in run.final if r.get("per_class")]
    if not final:
        return '<p class="note">No per-class scores in results.json.</p>'
    uri = plots.save("per_class_iou", plot_per_class(final))
    names = [c["class"] for c in final[0]["per_class"]]
    body = [[name, *[pct(r["per_class"][i].get("iou")) if i < len(r["per_class"]) else "–" for r in final]]
            for i, name in enumerate(names)]
    table = html_table(["class", *[f"IoU {r['split']} (%)" for r in final]], body, "per-class",
                       numeric=lambda i: i > 0)
    return img_tag(uri, "per-class IoU", "plot") + table


def curves_section(run: Run, plots: Plots) -> str:
    """mIoU-vs-threshold curves re-plotted from ``curves/*.json``: final rows, then per split
    across rounds (so a change of the best threshold between rounds is visible)."""
    from .evaluation.thresholds import load_curve, plot_curves

    with_curves = [r for r in run.rows if r.get("curve") and (run.path / r["curve"]).is_file()]
    if not with_curves:
        return ('<p class="note">No threshold curves in this run (only the fixed policy was '
                "evaluated, or curves were disabled).</p>")
    parts = []
    final_keys = {(r.get("tag"), r.get("head"), r["split"]) for r in run.final}
    final = [r for r in with_curves if (r.get("tag"), r.get("head"), r["split"]) in final_keys]
    threshold = float(run.results.get("threshold", DEFAULT_THRESHOLD))
    if final:
        curves, marks = {}, {"fixed": threshold}
        for r in final:
            label = f"{r['split']} ({r['protocol'].get('stage')})"
            curves[label] = load_curve(run.path / r["curve"])
            # A mark named like its curve is drawn in the curve's colour with a dot on it: one
            # threshold per split keeps the plot readable (the table has the others).
            chosen = (r.get("policies") or {}).get("heldout") or (r.get("policies") or {}).get("oracle")
            if chosen:
                marks[label] = float(chosen["threshold"])
        plot_curves(plots.path("curves_final"), curves, marks, title="mIoU vs background threshold (final CAMs)")
        parts.append(img_tag(png_uri(plots.path("curves_final").read_bytes()),
                             "threshold curves of the final CAMs", "plot half"))
    by_split: dict[str, list[dict[str, Any]]] = {}
    for r in with_curves:
        if "round" in r and r.get("head", "parent") == "parent":
            by_split.setdefault(r["split"], []).append(r)
    for split, rows in by_split.items():
        if len({r["round"] for r in rows}) < 2:
            continue
        curves = {f"round {r['round']} ({r['protocol'].get('stage')})": load_curve(run.path / r["curve"])
                  for r in sorted(rows, key=lambda r: r["round"])}
        name = f"curves_rounds_{_safe(split)}"
        plot_curves(plots.path(name), curves, {"fixed": threshold}, title=f"mIoU vs threshold per round: {split}")
        parts.append(img_tag(png_uri(plots.path(name).read_bytes()), f"threshold curves per round, {split}",
                             "plot half"))
    note = ('<p class="note">Grey dashed line: the fixed background score. On the final curves, a '
            "coloured dashed line and dot mark each split's held-out threshold (its oracle threshold "
            "when there is no held-out split).</p>")
    return f'<div class="row">{"".join(parts)}</div>{note}'



def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(text))


def rounds_section(run: Run, plots: Plots) -> Optional[str]:
    """Per-round mIoU (line plot) and the sub-category cluster statistics; None for one round."""
    series: dict[str, list[tuple[int, float]]] = {}
    for r in run.rows:
        if "round" in r and r.get("head", "parent") == "parent" and r["miou"] is not None:
            stage = r["protocol"].get("stage", "cam")
            label = r["split"] if stage == "cam" else f"{r['split']} ({stage})"
            series.setdefault(label, []).append((int(r["round"]), float(r["miou"])))
    clusters = (run.results.get("extra") or {}).get("clusters") or {}
    if len({p[0] for points in series.values() for p in points}) < 2 and not clusters:
        return None
    parts = []
    if series:
        parts.append(img_tag(plots.save("miou_per_round", plot_rounds(series)), "mIoU per round", "plot half"))
    if clusters:
        parts.append(cluster_tables(clusters))
    subtypes = subtype_table(run.results)
    if subtypes:
        parts.append(subtypes)
    return "".join(parts)


def subtype_table(results: dict[str, Any]) -> Optional[str]:
    """AMI and purity of each round's clusters against the declared sub-types; None without them."""
    ami, purity = results.get("subtype_ami") or {}, results.get("subtype_purity") or {}
    if not ami:
        return None

    def show(value: Any) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    rounds = sorted(ami, key=lambda t: int("".join(c for c in t if c.isdigit()) or 0))
    classes = list((ami[rounds[0]].get("per_class") or {}).keys())
    body = []
    for tag in rounds:
        for metric, table in (("AMI", ami), ("purity", purity)):
            scores = table.get(tag) or {}
            body.append([tag, metric, show(scores.get("mean")),
                         *[show((scores.get("per_class") or {}).get(name)) for name in classes]])
    return "".join([
        "<h3>Sub-categories against the true sub-types</h3>",
        html_table(["round", "score", "mean", *classes], body, "subtype-scores"),
        '<p class="note">Adjusted mutual information (0: unrelated to the true sub-types, 1: the '
        "same partition) and purity of each round's clusters; the mean covers the classes with two "
        "or more true sub-types (n/a for the others).</p>"])


def cluster_tables(clusters: dict[str, Any]) -> str:
    """Summary per round (pairs, sizes, changed) and the cluster sizes per class and round."""
    rounds = sorted(clusters, key=lambda t: int("".join(c for c in t if c.isdigit()) or 0))
    summary = []
    for tag in rounds:
        stats = clusters[tag]
        sizes = [n for per_class in (stats.get("sizes") or {}).values() for n in per_class if n > 0]
        pairs = stats.get("pairs", sum(sizes))
        changed = stats.get("changed")
        moved = "–" if changed is None else f"{changed} ({100 * changed / max(1, pairs):.1f} %)"
        summary.append([tag, pairs, len(sizes), min(sizes) if sizes else 0,
                        int(np.median(sizes)) if sizes else 0, max(sizes) if sizes else 0, moved])
    parts = ["<h3>Sub-category clusters</h3>",
             html_table(["round", "(image, class) pairs", "non-empty clusters", "min size", "median size",
                         "max size", "changed since previous round"], summary, "clusters",
                        numeric=lambda i: i > 0),
             '<p class="note">"changed" counts (image, class) pairs whose sub-category moved after '
             "matching cluster ids between rounds (a relabelling is not a change).</p>"]
    classes = list((clusters[rounds[-1]].get("sizes") or {}).keys()) if rounds else []
    body = [[name, *[" ".join(str(n) for n in sorted((clusters[t].get("sizes") or {}).get(name, []), reverse=True))
                     for t in rounds]] for name in classes]
    parts += ["<h3>Cluster sizes per class (largest first)</h3>",
              html_table(["class", *rounds], body, "cluster-sizes")]
    return "".join(parts)


def _legend(class_names: Sequence[str]) -> str:
    items = [f'<span class="swatch" style="background:{colour_hex(0)}"></span>background']
    items += [f'<span class="swatch" style="background:{colour_hex(i + 1)}"></span>{esc(n)}'
              for i, n in enumerate(class_names)]
    items.append(f'<span class="swatch" style="background:{colour_hex(IGNORE_INDEX)}"></span>ignore')
    return f'<p class="note">Colours:{"".join(items)}</p>'


class ExampleRenderer:
    """Thumbnails of one evaluation split: image, ground truth, CAMs, pseudo masks (cached)."""

    def __init__(self, dataset: Any, threshold: float) -> None:
        self.dataset = dataset
        self.threshold = threshold
        self._cache: dict[tuple[str, str], str] = {}

    def _photo(self, image_id: str) -> Image.Image:
        return self.dataset.load_image(image_id)

    def image(self, image_id: str) -> str:
        """The photo as a JPEG thumbnail."""
        key = ("image", image_id)
        if key not in self._cache:
            self._cache[key] = figure(data_uri(thumbnail(self._photo(image_id))), f"{image_id}")
        return self._cache[key]

    def truth(self, image_id: str) -> str:
        """The ground truth in VOC colours (PNG)."""
        key = ("truth", image_id)
        if key not in self._cache:
            mask = self.dataset.load_mask(image_id)
            self._cache[key] = figure(data_uri(thumbnail(mask_image(mask), nearest=True), "png"),
                                      "ground truth", "thumb mask")
        return self._cache[key]

    def cams(self, cam_dir: Path, image_id: str) -> tuple[list[str], float]:
        """One heat map per class of the CAM file, the pseudo mask, and the image's mIoU."""
        from .evaluation.camfiles import read_cam

        photo = self._photo(image_id)
        truth = self.dataset.load_mask(image_id)
        keys, cams = read_cam(cam_dir / f"{image_id}.npz", self.dataset.num_classes, truth.shape)
        names = self.dataset.class_names
        cells = [figure(data_uri(thumbnail(heatmap_overlay(photo, cam))), f"CAM {names[int(k)]} (max {cam.max():.2f})")
                 for k, cam in zip(keys, cams)]
        labels = pseudo_mask(keys, cams, self.threshold)
        score = image_miou(labels, truth, self.dataset.num_classes)
        cells.append(figure(data_uri(thumbnail(mask_image(labels), nearest=True), "png"),
                            f"pseudo mask @ {self.threshold:g}", "thumb mask"))
        return cells, score


def _split_for_examples(run: Run, split: Optional[str]) -> dict[str, Any]:
    final = [r for r in run.final if r.get("head", "parent") == "parent" and r.get("cams")] or \
        [r for r in run.final if r.get("cams")]
    if not final:
        raise DataError(f"{run.path / 'results.json'}: no final row with a CAM folder")
    if split is not None:
        chosen = [r for r in final if r["split"] == split]
        if not chosen:
            raise UserError(f"--split {split!r}: the final rows cover splits "
                            f"{', '.join(r['split'] for r in final)}")
        return chosen[0]
    return next((r for r in final if r["split"] == "val"), final[0])


def examples_section(run: Run, row: dict[str, Any], dataset: Any, renderer: ExampleRenderer,
                     count: int, seed: int) -> str:
    """Best, worst and random images of the final CAMs by per-image mIoU."""
    cam_dir = run.path / row["cams"]
    scores = score_images(cam_dir, dataset, renderer.threshold)
    if not scores:
        return f'<p class="warn">No CAM files in {esc(row["cams"])}.</p>'
    chosen = pick_examples(scores, count, seed)
    parts = [f'<p class="note">Split <b>{esc(row["split"])}</b>, CAMs <code>{esc(row["cams"])}</code> '
             f"({len(scores)} images ranked by per-image mIoU: mean IoU over the classes of the "
             f"image's ground truth, pseudo mask at background score {renderer.threshold:g}). "
             f"{count} best, {count} worst, {count} random (seed {seed}).</p>",
             _legend(dataset.class_names)]
    for kind, score in chosen:
        cells, _ = renderer.cams(cam_dir, score.image_id)
        label = f'<div class="label"><b>{esc(kind)}</b><br>{esc(score.image_id)}<br>mIoU {pct(score.miou)} %</div>'
        parts.append(f'<div class="row">{label}{renderer.image(score.image_id)}'
                     f'{renderer.truth(score.image_id)}{"".join(cells)}</div>')
    return "".join(parts)


def across_rounds_section(run: Run, row: dict[str, Any], dataset: Any, renderer: ExampleRenderer,
                          seed: int) -> Optional[str]:
    """The same images under every round's CAMs: the largest gain, the largest loss, one random."""
    rows = sorted((r for r in run.rows if "round" in r and r["split"] == row["split"]
                   and r.get("head", "parent") == "parent" and r.get("cams")
                   and r["protocol"].get("stage") == row["protocol"].get("stage")
                   and (run.path / r["cams"]).is_dir()), key=lambda r: int(r["round"]))
    if len({r["round"] for r in rows}) < 2:
        return None
    per_round = {int(r["round"]): {s.image_id: s.miou for s in score_images(run.path / r["cams"], dataset, renderer.threshold)}
                 for r in rows}
    first, last = min(per_round), max(per_round)
    common = [i for i in per_round[last] if i in per_round[first]
              and per_round[first][i] == per_round[first][i] and per_round[last][i] == per_round[last][i]]
    if not common:
        return None
    delta = {i: per_round[last][i] - per_round[first][i] for i in common}
    picks: list[tuple[str, str]] = []
    gain = max(common, key=lambda i: (delta[i], i))
    picks.append((f"largest gain ({pct(delta[gain])} points)", gain))
    loss = min(common, key=lambda i: (delta[i], i))
    if loss != gain:
        picks.append((f"largest loss ({pct(delta[loss])} points)", loss))
    rest = [i for i in common if i not in (gain, loss)]
    if rest:
        pick = rest[int(np.random.default_rng(seed + 1).integers(len(rest)))]
        picks.append((f"random ({pct(delta[pick])} points)", pick))
    parts = [f'<p class="note">Split <b>{esc(row["split"])}</b>: each block is one image under the CAMs '
             f"of rounds {first}..{last} (change of per-image mIoU from round {first} to {last}).</p>"]
    for kind, image_id in picks:
        parts.append(f"<h3>{esc(image_id)}: {esc(kind)}</h3>")
        # One table row per round; the image and its ground truth span all of them.
        span = f' rowspan="{len(rows)}"'
        lines = []
        for n, r in enumerate(rows):
            cells, score = renderer.cams(run.path / r["cams"], image_id)
            lead = (f"<td{span}>{renderer.image(image_id)}</td><td{span}>{renderer.truth(image_id)}</td>"
                    if n == 0 else "")
            lines.append(f'<tr>{lead}<td class="label">round {esc(r["round"])}<br>mIoU {pct(score)} %</td>'
                         f'<td><div class="row">{"".join(cells)}</div></td></tr>')
        parts.append(f'<table class="rounds">{"".join(lines)}</table>')
    return "".join(parts)


def gallery_section(run: Run, seed: int, per_cluster: int = 4) -> Optional[str]:
    """A few training images per sub-category of the last round, for 2-3 classes."""
    files = sorted(run.path.glob("subcategories/round*.npy"),
                   key=lambda p: int("".join(c for c in p.stem if c.isdigit()) or 0))
    files = [p for p in files if p.stem[len("round"):].isdigit()]   # not round<r>.targets.npy
    if not files:
        return None
    path = files[-1]
    try:
        assignment = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable sub-category file ({exc})") from None
    ids = run.train_ids()
    names = run.class_names
    if assignment.ndim != 2 or assignment.shape[0] != len(ids) or assignment.shape[1] != len(names):
        return (f'<p class="warn">{esc(path.name)} has shape {assignment.shape}, but the training split has '
                f"{len(ids)} images and {len(names)} classes: gallery skipped.</p>")
    root = run.data_root("train")

    clusters_per_class = [len(set(assignment[:, c][assignment[:, c] >= 0].tolist())) for c in range(len(names))]
    candidates = [c for c in range(len(names)) if clusters_per_class[c] >= 2]
    # Many clusters per class means many thumbnails: show fewer classes then, to stay small.
    n_classes = 3 if max(clusters_per_class, default=0) <= 6 else 2
    chosen = sorted(candidates, key=lambda c: (-(assignment[:, c] >= 0).sum(), c))[:n_classes]
    if not chosen:
        return '<p class="note">No class has two or more sub-categories.</p>'
    rng = np.random.default_rng(seed)
    parts = [f'<p class="note">From <code>{esc(path.relative_to(run.path))}</code>: up to {per_cluster} '
             f"random training images per sub-category of the {len(chosen)} classes with the most "
             "images; where a ground-truth mask exists, everything but the class is dimmed.</p>"]
    for c in chosen:
        column = assignment[:, c]
        parts.append(f"<h3>{esc(names[c])}</h3>")
        boxes = []
        for k in sorted(set(column[column >= 0].tolist())):
            members = np.flatnonzero(column == k)
            shown = sorted(rng.choice(members, size=min(per_cluster, len(members)), replace=False).tolist())
            cells = [img_tag(data_uri(thumbnail(_class_focus(root, ids[i], c, len(names)), GALLERY_THUMB)),
                             ids[i], "thumb small") for i in shown]
            boxes.append(f'<div class="cluster"><div class="caption">sub-category {k} · {len(members)} '
                         f'image{"s" if len(members) != 1 else ""}</div>{"".join(cells)}</div>')
        parts.append(f'<div class="row">{"".join(boxes)}</div>')
    return "".join(parts)


def _class_focus(root: Path, image_id: str, class_index: int, num_classes: int) -> Image.Image:
    """A training image with everything but ``class_index`` dimmed, when its mask exists.

    Images often hold several objects; dimming the rest shows which one the sub-category is
    about.  Without a mask (image-level labels only) the plain image is shown.
    """
    from .data.voc import IMAGE_DIR, MASK_DIRS, open_image, read_mask

    image = open_image(root / IMAGE_DIR / f"{image_id}.jpg")
    mask_path = next((root / d / f"{image_id}.png" for d in MASK_DIRS if (root / d / f"{image_id}.png").is_file()), None)
    if mask_path is None:
        return image
    mask = read_mask(mask_path, num_classes)
    if mask.shape != (image.height, image.width) or not (mask == class_index + 1).any():
        return image
    pixels = np.asarray(image, np.float32)
    keep = (mask == class_index + 1)[..., None]
    return Image.fromarray(np.where(keep, pixels, 0.3 * pixels + 40).astype(np.uint8), mode="RGB")


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


# --------------------------------------------------------------------------------------------
# Bench
# --------------------------------------------------------------------------------------------

def _show(value: Any) -> str:
    # A component given as a mapping shows its name, as in bench.md.
    if isinstance(value, dict) and "name" in value:
        return str(value["name"])
    return str(value)


def _round_key(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1


def bench_report(folder: Path, plots: Plots) -> str:
    """The HTML page of a bench folder."""
    data = _read_json(folder / "bench.json")
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise UserError(f"{folder / 'bench.json'}: not a bench file (no 'rows' list)")
    rows = data["rows"]
    spec = data.get("spec") or {}
    labels = spec.get("labels") or {}
    axes = [k for k in (spec.get("matrix") or {}) if k != "seed"]
    if not axes:   # a bench.json without its spec: take the axes from the groups
        axes = list(dict.fromkeys(k for r in rows for k in (r.get("group") or {})))
    titles = [labels.get(a, a) for a in axes]
    header = [*titles, "split", "round", "stage", "mIoU % (mean ± std)", "per seed (%)", "n seeds",
              "time / cell (s)", "peak RSS (MB)"]
    body = []
    for r in rows:
        group = r.get("group") or {}
        body.append([*[_show(group.get(a, "")) for a in axes], r.get("split", ""), r.get("round", ""),
                     r.get("stage", ""), f"{pct(r.get('miou_mean'))} ± {pct(r.get('miou_std'))}",
                     " ".join(pct(m) for m in r.get("mious") or []), r.get("n", ""),
                     f"{r['seconds_mean']:.0f}" if r.get("seconds_mean") is not None else "–",
                     f"{r['peak_rss_mb_max']:.0f}" if r.get("peak_rss_mb_max") is not None else "–"])
    first_number = len(axes) + 3
    table = html_table(header, body, "bench", numeric=lambda i: i >= first_number)
    proto = rows[0].get("protocol", {}) if rows else {}
    seeds = sorted({s for r in rows for s in (r.get("seeds") or []) if s is not None})
    protocol = (f"CAM seeds (stage cam = head-weight CAM; other stages name the post-hoc method), "
                f"threshold policy {proto.get('threshold_policy')} (background score {proto.get('threshold')}), "
                f"ignore label {proto.get('ignore_index')}, mIoU over {proto.get('mean_over')}; seeds {seeds}; "
                "std is the sample std over seeds.")
    sections = [("table", "Bench table", table + f"<p><b>Protocol:</b> {esc(protocol)}</p>")]
    chart = bench_chart(rows, axes, plots)
    if chart:
        sections.append(("chart", "mIoU per group", chart))
    cells = sorted(p.name for p in (folder / "cells").iterdir() if p.is_dir()) if (folder / "cells").is_dir() else []
    items = [("bench", data.get("name", folder.name)), ("description", spec.get("description")),
             ("preset", spec.get("preset")), ("axes", ", ".join(titles) or "–"), ("seeds", seeds),
             ("cell folders", len(cells)), ("folder", folder.resolve().name)]
    meta = "".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in items if v not in (None, ""))
    return page(f"Bench: {data.get('name', folder.name)}", sections, f'<table class="meta">{meta}</table>')


def bench_chart(rows: list[dict[str, Any]], axes: list[str], plots: Plots) -> Optional[str]:
    """Mean ± std mIoU per group on ``val`` (or the first split): each group's last round of
    the head-weight CAM stage (else its first stage), i.e. its final number."""
    splits = list(dict.fromkeys(r.get("split") for r in rows))
    if not splits:
        return None
    split = "val" if "val" in splits else splits[0]
    groups: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r.get("split") != split or r.get("miou_mean") is None:
            continue
        group = r.get("group") or {}
        label = ", ".join(_show(group.get(a, "")) for a in axes) or "all"
        best = groups.get(label)
        rank = (r.get("stage") == "cam", _round_key(r.get("round")))
        if best is None or rank > (best.get("stage") == "cam", _round_key(best.get("round"))):
            groups[label] = r
    if not groups:
        return None
    labels = list(groups)
    data = plot_bench(labels, [groups[g]["miou_mean"] for g in labels],
                      [groups[g].get("miou_std") or 0.0 for g in labels],
                      f"mIoU on {split}: mean ± std over seeds")
    uri = plots.save("bench_miou", data)
    used = ", ".join(f"{g}: round {'–' if groups[g].get('round') in (None, '') else groups[g]['round']}, "
                     f"stage {groups[g].get('stage')}" for g in labels)
    return img_tag(uri, f"bench mIoU per group ({split})", "plot") + f'<p class="note">Rows shown: {esc(used)}.</p>'


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------

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


__all__ = ["build_report", "folder_kind", "image_miou", "pick_examples", "voc_palette"]

