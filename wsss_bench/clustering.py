"""Calling clusterer plugins: optional metadata, per-class K, and a check of what they return.

The clusterer contract is ``fit_predict(features, k, seed) -> labels`` (see
:func:`wsss_bench.hookspecs.register_clusterers`).  Two optional extensions, both ignored by
clusterers that do not declare them, so third-party plugins keep working unchanged:

* ``fit_predict(features, k, seed, metadata=None)``: a clusterer whose ``fit_predict`` accepts a
  ``metadata`` argument receives a :class:`ClusterMetadata` for the class being clustered (image
  ids, class name and index and, when the dataset declares them, the true sub-types);
* ``choose_k(metadata) -> int``: a clusterer may set a class's K itself (the ``oracle`` uses the
  true sub-type count); SC-CAM sizes its sub-category head from the result.
"""
from __future__ import annotations

import inspect
from typing import Any, Optional, TypedDict

import numpy as np

from . import contracts


class ClusterMetadata(TypedDict):
    """What a clusterer may know about the images of one class besides their features."""

    class_index: int
    class_name: str
    image_ids: list[str]
    #: True sub-type per image (``[n]`` int64), or None when the dataset declares none.
    subtypes: Optional[np.ndarray]
    #: Declared number of true sub-types of the class, or None.
    num_subtypes: Optional[int]


def accepts_metadata(clusterer: Any) -> bool:
    """Whether ``clusterer.fit_predict`` takes a ``metadata`` argument (or ``**kwargs``)."""
    try:
        params = inspect.signature(clusterer.fit_predict).parameters
    except (TypeError, ValueError):
        return False
    return "metadata" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def choose_k(clusterer: Any, k: int, metadata: ClusterMetadata) -> int:
    """K for one class: the clusterer's own choice when it makes one, else ``k``."""
    chooser = getattr(clusterer, "choose_k", None)
    if chooser is None:
        return k
    return contracts.check_chosen_k(clusterer, chooser(metadata), metadata)


def fit_predict(clusterer: Any, features: np.ndarray, k: int, seed: int,
                metadata: Optional[ClusterMetadata] = None) -> np.ndarray:
    """Call the clusterer and check its labels (:func:`wsss_bench.contracts.check_labels`):
    ``int64 [N]`` with values in ``[0, k)``; a violation names the plugin and its distribution."""
    if metadata is not None and accepts_metadata(clusterer):
        labels = clusterer.fit_predict(features, k, seed, metadata=metadata)
    else:
        labels = clusterer.fit_predict(features, k, seed)
    return contracts.check_labels(clusterer, labels, len(features), k)
