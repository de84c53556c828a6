"""How well sub-category clusters recover a dataset's declared sub-types: AMI and purity.

SC-CAM's mechanism only helps when its clusters mean something; on a dataset that declares the
true sub-type of every (image, class) (:mod:`wsss_bench.data.subtypes`) this can be measured
instead of guessed.  Per class, over the images holding it:

* AMI: :func:`sklearn.metrics.adjusted_mutual_info_score` of (true sub-type, cluster id):
  0 for clusters unrelated to the sub-types, 1 for a relabelling of them;
* purity: the share of images whose cluster's majority sub-type is their own (from
  :func:`sklearn.metrics.cluster.contingency_matrix`); 1 when every cluster is pure, but also
  trivially high for many small clusters, so read it beside AMI.

The mean is taken over the classes with two or more true sub-types among those images; a class
with one (nothing to recover) is reported as ``None`` ("n/a").
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np


def class_scores(truth: np.ndarray, clusters: np.ndarray) -> tuple[Optional[float], Optional[float]]:
    """(AMI, purity) of one class's clusters; (None, None) with fewer than two true sub-types."""
    from sklearn.metrics import adjusted_mutual_info_score
    from sklearn.metrics.cluster import contingency_matrix

    if truth.size == 0 or np.unique(truth).size < 2:
        return None, None
    ami = float(adjusted_mutual_info_score(truth, clusters))
    table = contingency_matrix(truth, clusters)
    purity = float(table.max(axis=0).sum() / truth.size)
    return ami, purity


def subtype_scores(assignment: np.ndarray, truth: np.ndarray,
                   class_names: Sequence[str]) -> dict[str, Any]:
    """Per-class and mean AMI / purity of ``assignment`` ``[N, C]`` against ``truth`` ``[N, C]``.

    Both hold -1 where the image lacks the class; only pairs present in both are scored.
    """
    if assignment.shape != truth.shape:
        raise ValueError(f"assignment {assignment.shape} and truth {truth.shape} differ in shape")
    ami: dict[str, Optional[float]] = {}
    purity: dict[str, Optional[float]] = {}
    for c, name in enumerate(class_names):
        members = (assignment[:, c] >= 0) & (truth[:, c] >= 0)
        ami[name], purity[name] = class_scores(truth[members, c], assignment[members, c])
    scored = [name for name in class_names if ami[name] is not None]
    return {
        "ami": {"mean": float(np.mean([ami[n] for n in scored])) if scored else None, "per_class": ami},
        "purity": {"mean": float(np.mean([purity[n] for n in scored])) if scored else None,
                   "per_class": purity},
        "classes_scored": len(scored),
    }
