"""The two names of a result row: the pipeline ``stage`` and the ``cam_method``.

A row says which stage of the pipeline it scores, ``stage``: ``cam`` (the CAMs at a background
threshold), ``refined:<refiner>`` (pseudo masks of a refiner plugin) or ``seg`` (a segmentation
network trained on pseudo masks), at the row's top level and in its protocol.  The protocol's
``cam_method`` names the map the CAMs came from (``cam``, ``cam-sub``, ``gradcam``, ...).

Results written before the pipeline had stages stored the CAM method under ``protocol.stage``;
:func:`migrate_row` reads those as ``stage: cam`` with that ``cam_method``, so old run folders
and bench cells still load, report and aggregate.
"""
from __future__ import annotations

from typing import Any

#: The stage of a row scoring CAMs, and the prefix of a refined row's stage.
CAM, REFINED, SEG = "cam", "refined", "seg"


def refined_stage(refiner: str) -> str:
    """``refined:<refiner>``."""
    return f"{REFINED}:{refiner}"


def migrate_row(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with ``stage`` and ``protocol.cam_method`` (a legacy row's ``protocol.stage``
    becomes its ``cam_method``); rows already in the current layout are returned as they are."""
    protocol = dict(row.get("protocol") or {})
    if "cam_method" not in protocol:
        protocol["cam_method"] = protocol.get("stage", CAM)
        protocol["stage"] = CAM
    return {**row, "protocol": protocol, "stage": row.get("stage", protocol["stage"])}


def migrate_results(results: dict[str, Any]) -> dict[str, Any]:
    """``results.json`` content with every row (``rows``, ``final``) migrated."""
    out = dict(results)
    for key in ("rows", "final"):
        if isinstance(out.get(key), list):
            out[key] = [migrate_row(r) if isinstance(r, dict) else r for r in out[key]]
    return out


def stage_of(row: dict[str, Any]) -> str:
    """The row's pipeline stage (``cam`` for legacy rows)."""
    return str(migrate_row(row)["stage"])


def cam_method_of(row: dict[str, Any]) -> str:
    """The row's CAM method (``-`` where the row scores masks of unknown origin)."""
    value = migrate_row(row)["protocol"].get("cam_method")
    return "-" if value is None else str(value)
