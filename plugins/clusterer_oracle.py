"""The ``oracle`` clusterer: returns the dataset's declared true sub-types.

It ignores the features.  Each class's K becomes its true sub-type count (``choose_k``), so
SC-CAM's sub-category head is sized from it.  An SC-CAM run with this clusterer is the upper
bound of the method's mechanism on that data: sub-category labels that are exactly right.
One round is enough (the labels do not depend on the model).  Needs a dataset that declares
sub-types (``subtype_labels.json``, see :mod:`wsss_bench.data.subtypes`).
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict

from wsss_bench.clustering import ClusterMetadata
from wsss_bench.errors import ConfigError
from wsss_bench.hookspecs import hookimpl


class OracleOptions(BaseModel):
    """The oracle has no options."""

    model_config = ConfigDict(extra="forbid")


def _require(metadata: Optional[ClusterMetadata]) -> ClusterMetadata:
    if metadata is None or metadata.get("subtypes") is None:
        raise ConfigError("clusterer 'oracle' needs a dataset that declares its true sub-types "
                          "(subtype_labels.json); this dataset declares none")
    return metadata


class OracleClusterer:
    """True sub-types as cluster labels (see the module docstring)."""

    def choose_k(self, metadata: ClusterMetadata) -> int:
        """The class's declared number of true sub-types."""
        meta = _require(metadata)
        return int(meta["num_subtypes"] or int(np.max(meta["subtypes"], initial=0)) + 1)

    def fit_predict(self, features: np.ndarray, k: int, seed: int,
                    metadata: Optional[ClusterMetadata] = None) -> np.ndarray:
        """The true sub-type of every image (features and seed are not used)."""
        truth = np.asarray(_require(metadata)["subtypes"], np.int64)
        if truth.shape != (len(features),):
            raise ConfigError(f"clusterer 'oracle': {truth.size} declared sub-types for "
                              f"{len(features)} images")
        if truth.size and (truth.min() < 0 or truth.max() >= k):
            raise ConfigError(f"clusterer 'oracle': true sub-types reach {truth.max()} but K is {k}")
        return truth


@hookimpl
def register_clusterers(register: Any) -> None:
    register("oracle", OracleClusterer, options=OracleOptions,
             help="the dataset's true sub-types (upper bound of SC-CAM's mechanism; needs declared sub-types)")
