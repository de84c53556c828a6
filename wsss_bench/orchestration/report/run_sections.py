"""Sections of a run report: results, per-class IoU, curves, rounds, sub-types, clusters."""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from ...evaluation import DEFAULT_THRESHOLD
from ...evaluation.rows import cam_method_of, stage_of
from ...evaluation.tables import pct
from .html import esc, html_table, img_tag
from .images import png_uri
from .loading import Run
from .plots import Plots, plot_per_class, plot_rounds


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
    header = ["split", *(["round"] if has_round else []), *(["head"] if has_head else []), "stage", "cam method",
              f"fixed mIoU (%) @ {threshold}", *[titles[p] for p in policies], "images"]
    final_ids = {(r.get("tag"), r.get("head"), r["split"]) for r in run.final}
    body, classes = [], []
    for r in rows:
        body.append([r["split"], *([r.get("round", "")] if has_round else []),
                     *([r.get("head", "parent")] if has_head else []), stage_of(r), cam_method_of(r),
                     pct(r["miou"]), *[_policy_cell(r, p) for p in policies], r.get("num_images", "")])
        is_final = (r.get("tag"), r.get("head"), r["split"]) in final_ids
        classes.append("final" if is_final else "")
    first_number = header.index(f"fixed mIoU (%) @ {threshold}")
    table = html_table(header, body, "results", numeric=lambda i: i >= first_number, row_classes=classes)
    from ...evaluation.tables import protocol_line

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
    from ...evaluation.thresholds import load_curve, plot_curves

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
        if ("round" in r and r.get("head", "parent") == "parent" and r["miou"] is not None
                and stage_of(r) == "cam"):
            stage = cam_method_of(r)
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
