"""True sub-types declared by a dataset: ``subtype_labels.json`` at the root of a VOC tree.

A dataset whose classes have known sub-categories (the embedded synthetic set, Fashion-MNIST
scenes) may declare, per (image, class), the sub-type of the class's *largest* visible object
(ties: the lowest object id)::

    {"format": "wsss_bench.subtypes/1",
     "num_subtypes": [n_0, ..., n_{C-1}],          # true sub-type count per class
     "subtype_names": [[name, ...], ...],          # optional, per class
     "labels": {image_id: [s_0, ..., s_{C-1}]}}    # 0-based sub-type, -1 where the class is absent

The host uses it for diagnostics only (how well SC-CAM's clusters recover the sub-types) and
hands it to clusterers as optional metadata (the ``oracle`` clusterer returns it).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import DataError

SUBTYPE_FILE = "subtype_labels.json"
SUBTYPE_FORMAT = "wsss_bench.subtypes/1"


@dataclass(frozen=True)
class SubtypeTruth:
    """Declared sub-types of one tree."""

    num_subtypes: list[int]
    names: Optional[list[list[str]]]
    labels: dict[str, list[int]]

    def matrix(self, ids: Sequence[str]) -> np.ndarray:
        """``[N, C]`` int64 sub-type per (image, class), -1 where absent; every id must be declared."""
        missing = [i for i in ids if i not in self.labels]
        if missing:
            raise DataError(f"{SUBTYPE_FILE}: no sub-types declared for {missing[0]!r}"
                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        return np.array([self.labels[i] for i in ids], np.int64).reshape(len(ids), len(self.num_subtypes))


def read_subtype_truth(root: Path, num_classes: int) -> Optional[SubtypeTruth]:
    """The tree's declared sub-types, or None when it declares none (no file)."""
    path = Path(root) / SUBTYPE_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read sub-type labels ({exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != SUBTYPE_FORMAT:
        raise DataError(f"{path}: expected a JSON object with format {SUBTYPE_FORMAT!r}")
    counts, labels, names = raw.get("num_subtypes"), raw.get("labels"), raw.get("subtype_names")
    if (not isinstance(counts, list) or len(counts) != num_classes
            or not all(isinstance(n, int) and n >= 1 for n in counts)):
        raise DataError(f"{path}: num_subtypes must list a positive count for each of the "
                        f"{num_classes} classes")
    if not isinstance(labels, dict):
        raise DataError(f"{path}: labels must map image ids to per-class sub-types")
    for image_id, row in labels.items():
        if (not isinstance(row, list) or len(row) != num_classes
                or not all(isinstance(s, int) and -1 <= s < n for s, n in zip(row, counts))):
            raise DataError(f"{path}: sub-types of {image_id!r} must be {num_classes} integers, "
                            f"each -1 or below its class's num_subtypes, got {row!r}")
    if names is not None and (not isinstance(names, list) or len(names) != num_classes):
        raise DataError(f"{path}: subtype_names must hold one list per class")
    return SubtypeTruth(list(counts), names, labels)
