"""The bench report page: the aggregated table and a bar chart per group."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ...errors import UserError
from ...evaluation.tables import pct
from .html import esc, html_table, img_tag, page
from .loading import _read_json
from .plots import Plots, plot_bench


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
    rows = [_migrate_bench_row(r) for r in data["rows"] if isinstance(r, dict)]
    spec = data.get("spec") or {}
    labels = spec.get("labels") or {}
    axes = [k for k in (spec.get("matrix") or {}) if k != "seed"]
    if not axes:   # a bench.json without its spec: take the axes from the groups
        axes = list(dict.fromkeys(k for r in rows for k in (r.get("group") or {})))
    titles = [labels.get(a, a) for a in axes]
    header = [*titles, "split", "round", "cam method", "stage", "mIoU % (mean ± std)", "per seed (%)", "n seeds",
              "time / cell (s)", "peak RSS (MB)"]
    body = []
    for r in rows:
        group = r.get("group") or {}
        body.append([*[_show(group.get(a, "")) for a in axes], r.get("split", ""), r.get("round", ""),
                     r.get("cam_method", ""), r.get("stage", ""), f"{pct(r.get('miou_mean'))} ± {pct(r.get('miou_std'))}",
                     " ".join(pct(m) for m in r.get("mious") or []), r.get("n", ""),
                     f"{r['seconds_mean']:.0f}" if r.get("seconds_mean") is not None else "–",
                     f"{r['peak_rss_mb_max']:.0f}" if r.get("peak_rss_mb_max") is not None else "–"])
    first_number = len(axes) + 4
    table = html_table(header, body, "bench", numeric=lambda i: i >= first_number)
    proto = rows[0].get("protocol", {}) if rows else {}
    seeds = sorted({s for r in rows for s in (r.get("seeds") or []) if s is not None})
    protocol = (f"CAM seeds (cam method cam = head-weight CAM, others name the post-hoc method; stage "
                f"cam scores CAMs, refined:<refiner> pseudo masks, seg the segmentation network), "
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
    the head-weight CAMs (stage and cam method cam, else the first there is), i.e. its final CAM number."""
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
        rank = (r.get("stage") == "cam", r.get("cam_method") == "cam", _round_key(r.get("round")))
        if best is None or rank > (best.get("stage") == "cam", best.get("cam_method") == "cam",
                                   _round_key(best.get("round"))):
            groups[label] = r
    if not groups:
        return None
    labels = list(groups)
    data = plot_bench(labels, [groups[g]["miou_mean"] for g in labels],
                      [groups[g].get("miou_std") or 0.0 for g in labels],
                      f"mIoU on {split}: mean ± std over seeds")
    uri = plots.save("bench_miou", data)
    used = ", ".join(f"{g}: round {'–' if groups[g].get('round') in (None, '') else groups[g]['round']}, "
                     f"cam method {groups[g].get('cam_method')}" for g in labels)
    return img_tag(uri, f"bench mIoU per group ({split})", "plot") + f'<p class="note">Rows shown: {esc(used)}.</p>'


def _migrate_bench_row(row: dict[str, Any]) -> dict[str, Any]:
    """A bench row of either layout: before stages, ``stage`` held the CAM method."""
    if "cam_method" in row:
        return row
    return {**row, "cam_method": row.get("stage", "cam"), "stage": "cam"}
