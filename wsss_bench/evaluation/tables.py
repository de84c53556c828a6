"""Markdown tables of results, ready to paste into a paper or an issue."""
from __future__ import annotations

from typing import Any, Optional, Sequence

from . import DEFAULT_THRESHOLD
from .rows import cam_method_of, stage_of


def pct(value: Optional[float], digits: int = 1) -> str:
    """A fraction as a percentage string; missing values as an en dash."""
    return "–" if value is None or value != value else f"{100 * value:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def protocol_line(row: dict[str, Any]) -> str:
    """One line stating how a number was measured."""
    p = row.get("protocol", {})
    if p.get("threshold_policy") is None and "ignore_policy" in p:
        made = "".join(f", {key} `{p[key]}`" for key in ("refiner", "crf") if key in p)
        return (f"split `{p.get('split')}`, stage `{p.get('stage')}`{made}, label maps with unsure "
                f"pixels (255) scored as `{p['ignore_policy']}`, coverage {pct(p.get('coverage'))} % of "
                f"labelled pixels, ignore label {p.get('ignore_index')}, mIoU over {p.get('mean_over')}")
    return (f"split `{p.get('split')}`, stage `{p.get('stage')}`, threshold policy "
            f"`{p.get('threshold_policy')}` (bg = {p.get('threshold')}), ignore label "
            f"{p.get('ignore_index')}, mIoU over {p.get('mean_over')}")


def results_markdown(results: dict[str, Any]) -> str:
    """The ``results.md`` of a run: summary rows, then per-class IoU of the final rows."""
    rows = results["rows"]
    extra_cols = [c for c in ("round",) if any(c in r for r in rows)]
    policies = [p for p in ("heldout", "oracle") if any(p in r.get("policies", {}) for r in rows)]
    titles = {"heldout": "held-out thr. mIoU (%)", "oracle": "oracle thr. mIoU (%, upper bound)"}
    at = results.get("threshold", DEFAULT_THRESHOLD)
    header = ["split", *extra_cols, "stage", "cam method", "mIoU (%)" if at is None else f"mIoU (%) @ {at}",
              *[titles[p] for p in policies], "images"]

    def policy_cell(row: dict[str, Any], name: str) -> str:
        found = row.get("policies", {}).get(name)
        return "–" if not found else f"{pct(found['miou'])} (t={found['threshold']:.2f})"

    body = [[r["split"], *[r.get(c, "") for c in extra_cols], stage_of(r), cam_method_of(r),
             pct(r["miou"]), *[policy_cell(r, p) for p in policies], r["num_images"]] for r in rows]
    # `wsss eval` scores files: it has no backbone or seed to name.
    backbone = f" ({results['backbone']})" if results.get("backbone") not in (None, "-") else ""
    seed = f"seed {results['seed']}, " if results.get("seed") is not None else ""
    parts = [f"# {results['method']} on {results['dataset']}{backbone}", "",
             f"{seed}device {results['device']}, wall time {results['wall_time_s']:.1f} s", "",
             markdown_table(header, body), ""]
    if rows:
        parts += ["Protocol: " + protocol_line(rows[-1]), ""]
    final = results.get("final", [])
    if final:
        names = [c["class"] for c in final[0]["per_class"]]
        header = ["class", *[f"IoU {r['split']} (%)" for r in final]]
        body = [[name, *[pct(r["per_class"][i]["iou"]) for r in final]] for i, name in enumerate(names)]
        parts += ["## Per-class IoU of the final CAMs", "", markdown_table(header, body), ""]
    for title, table in results.get("tables", {}).items():
        parts += [f"## {title}", "", table, ""]
    return "\n".join(parts)
