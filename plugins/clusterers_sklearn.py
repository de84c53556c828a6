"""Clustering algorithms from scikit-learn, registered as wsss-bench clusterers.

SC-CAM splits the images of each parent class into ``k`` sub-categories by clustering their
image-level features (``N x D``, non-negative, ``D`` up to 4096).  Every clusterer here follows
the contract of :func:`wsss_bench.hookspecs.register_clusterers`::

    labels = clusterer.fit_predict(features, k, seed)   # int64, shape (N,), values in [0, k)
    clusterer.last_stats                                # dict describing the last call

The rules shared by all clusterers live in the host, :class:`wsss_bench.clusterer_base.BaseClusterer`, so a new
algorithm only implements :meth:`BaseClusterer._cluster`:

* ``features`` must be a non-empty 2-D array of real numbers; rows holding NaN or Inf raise
  :class:`wsss_bench.errors.DataError` naming how many rows are bad.
* **k larger than N**: the algorithm is asked for ``k_eff = min(k, N)`` clusters.  When
  ``N <= k`` every image is its own cluster (``labels == arange(N)``) and the algorithm is not
  called, since no algorithm can do anything else with ``N`` clusters for ``N`` points.  Labels
  therefore always lie in ``[0, k_eff)``, a subset of ``[0, k)``; some of the ``k`` labels may
  be unused.
* ``k == 1`` or ``N == 1`` returns all zeros without calling the algorithm.
* Features are converted to C-contiguous float64 before they reach scikit-learn, so the result
  depends only on the values and the seed, not on whether the caller passed float32 or float64.
* The labels are the algorithm's own (no canonical relabelling), always ``int64`` of shape
  ``(N,)``.
* ``last_stats`` always holds ``n_samples``, ``k``, ``k_eff`` and ``inertia`` (the
  within-cluster sum of squared Euclidean distances of the returned partition to its cluster
  means, computed the same way for every algorithm so that they can be compared), plus
  algorithm-specific entries such as ``n_iter``.

scikit-learn is imported lazily inside each clusterer: plugin modules are imported whenever a
command needs any registry (``wsss run``, ``wsss list``), and ``sklearn.cluster`` alone costs
about a second to import.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from wsss_bench.clusterer_base import (BaseClusterer, ClustererOptions, validate_features,
                                       within_cluster_ss)
from wsss_bench.hookspecs import hookimpl

__all__ = [
    "AgglomerativeOptions",
    "BaseClusterer",
    "ClustererOptions",
    "GMMOptions",
    "KMeansOptions",
    "MiniBatchKMeansOptions",
    "SklearnAgglomerative",
    "SklearnGMM",
    "SklearnKMeans",
    "SklearnMiniBatchKMeans",
    "SklearnSpectral",
    "SpectralOptions",
    "register_clusterers",
    "validate_features",
    "within_cluster_ss",
]

# --------------------------------------------------------------------------------------------
# Options models
# --------------------------------------------------------------------------------------------


class KMeansOptions(ClustererOptions):
    """Options of ``kmeans`` (defaults reproduce SC-CAM's ``KMeans(n_clusters=10)``)."""

    # Explicit because scikit-learn >= 1.4 changed the default n_init to "auto" (1 run with
    # k-means++), which would silently differ from the original's 10 restarts.
    n_init: int = Field(10, ge=1, le=1000, description="independent k-means++ restarts")
    max_iter: int = Field(300, ge=1, le=100_000, description="Lloyd iterations per restart")
    tol: float = Field(1e-4, ge=0.0, le=1.0, description="centre-shift tolerance (x mean var)")
    init: Literal["k-means++", "random"] = "k-means++"


class MiniBatchKMeansOptions(ClustererOptions):
    """Options of ``minibatch-kmeans``."""

    n_init: int = Field(3, ge=1, le=1000)
    batch_size: int = Field(1024, ge=1, le=10_000_000)
    max_iter: int = Field(100, ge=1, le=100_000, description="passes over the data")
    init: Literal["k-means++", "random"] = "k-means++"


class GMMOptions(ClustererOptions):
    """Options of ``gmm``.

    ``covariance_type="full"`` stores ``k x D x D`` matrices: about 1.3 GB for k=10, D=4096.
    """

    covariance_type: Literal["diag", "spherical", "tied", "full"] = "diag"
    n_init: int = Field(1, ge=1, le=1000)
    reg_covar: float = Field(1e-6, gt=0.0, le=1e3)
    max_iter: int = Field(100, ge=1, le=100_000)
    tol: float = Field(1e-3, gt=0.0, le=1.0)
    init_params: Literal["kmeans", "k-means++", "random", "random_from_data"] = "kmeans"


class AgglomerativeOptions(ClustererOptions):
    """Options of ``agglomerative`` (memory and time grow as N^2)."""

    linkage: Literal["ward", "complete", "average", "single"] = "ward"
    metric: Literal["euclidean", "l1", "manhattan", "cosine"] = "euclidean"

    @model_validator(mode="after")
    def _ward_is_euclidean(self) -> AgglomerativeOptions:
        if self.linkage == "ward" and self.metric != "euclidean":
            raise ValueError("linkage='ward' only works with metric='euclidean'")
        return self


class SpectralOptions(ClustererOptions):
    """Options of ``spectral``."""

    affinity: Literal["nearest_neighbors", "rbf"] = "nearest_neighbors"
    n_neighbors: int = Field(10, ge=1, le=100_000, description="capped at N-1 for small N")
    gamma: float = Field(1.0, gt=0.0, description="rbf kernel width (affinity='rbf' only)")
    # cluster_qr needs no random restarts and is deterministic; "kmeans" is the classic choice.
    assign_labels: Literal["cluster_qr", "kmeans", "discretize"] = "cluster_qr"
    n_init: int = Field(10, ge=1, le=1000, description="k-means restarts (assign_labels='kmeans')")


# --------------------------------------------------------------------------------------------
# Clusterers
# --------------------------------------------------------------------------------------------


class SklearnKMeans(BaseClusterer):
    """scikit-learn ``KMeans`` (Lloyd, k-means++ init, best of ``n_init`` restarts)."""

    name = "kmeans"

    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.options = KMeansOptions(**options)

    def _cluster(self, x: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
        from sklearn.cluster import KMeans

        opts = self.options
        model = KMeans(
            n_clusters=k,
            init=opts.init,
            n_init=opts.n_init,
            max_iter=opts.max_iter,
            tol=opts.tol,
            random_state=seed,
        )
        labels = model.fit_predict(x)
        return labels, {"algo_inertia": float(model.inertia_), "n_iter": int(model.n_iter_)}


class SklearnMiniBatchKMeans(BaseClusterer):
    """scikit-learn ``MiniBatchKMeans``: faster, slightly worse inertia than ``kmeans``."""

    name = "minibatch-kmeans"

    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.options = MiniBatchKMeansOptions(**options)

    def _cluster(self, x: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
        from sklearn.cluster import MiniBatchKMeans

        opts = self.options
        model = MiniBatchKMeans(
            n_clusters=k,
            init=opts.init,
            n_init=opts.n_init,
            batch_size=opts.batch_size,
            max_iter=opts.max_iter,
            random_state=seed,
        )
        labels = model.fit_predict(x)
        return labels, {"algo_inertia": float(model.inertia_), "n_iter": int(model.n_iter_)}


class SklearnGMM(BaseClusterer):
    """scikit-learn ``GaussianMixture``; each image gets its most probable component."""

    name = "gmm"

    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.options = GMMOptions(**options)

    def _cluster(self, x: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
        from sklearn.mixture import GaussianMixture

        opts = self.options
        model = GaussianMixture(
            n_components=k,
            covariance_type=opts.covariance_type,
            n_init=opts.n_init,
            reg_covar=opts.reg_covar,
            max_iter=opts.max_iter,
            tol=opts.tol,
            init_params=opts.init_params,
            random_state=seed,
        )
        labels = model.fit_predict(x)
        return labels, {
            "n_iter": int(model.n_iter_),
            "converged": bool(model.converged_),
            "lower_bound": float(model.lower_bound_),
        }


class SklearnAgglomerative(BaseClusterer):
    """scikit-learn ``AgglomerativeClustering`` (deterministic: the seed is not used)."""

    name = "agglomerative"

    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.options = AgglomerativeOptions(**options)

    def _cluster(self, x: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
        from sklearn.cluster import AgglomerativeClustering

        model = AgglomerativeClustering(
            n_clusters=k, linkage=self.options.linkage, metric=self.options.metric
        )
        return model.fit_predict(x), {}


class SklearnSpectral(BaseClusterer):
    """scikit-learn ``SpectralClustering`` on a k-nearest-neighbour (or RBF) affinity graph."""

    name = "spectral"

    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.options = SpectralOptions(**options)

    def _cluster(self, x: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
        from sklearn.cluster import SpectralClustering

        opts = self.options
        # A point cannot have more neighbours than N-1 others; scikit-learn would raise.
        n_neighbors = min(opts.n_neighbors, x.shape[0] - 1)
        model = SpectralClustering(
            n_clusters=k,
            affinity=opts.affinity,
            n_neighbors=n_neighbors,
            gamma=opts.gamma,
            assign_labels=opts.assign_labels,
            n_init=opts.n_init,
            random_state=seed,
        )
        return model.fit_predict(x), {"n_neighbors": n_neighbors}


@hookimpl
def register_clusterers(register: Any) -> None:
    """Register the scikit-learn clusterers."""
    register(
        "kmeans",
        SklearnKMeans,
        help="scikit-learn KMeans (k-means++, n_init=10): the SC-CAM default",
        options=KMeansOptions,
    )
    register(
        "minibatch-kmeans",
        SklearnMiniBatchKMeans,
        help="scikit-learn MiniBatchKMeans (n_init=3, batch 1024): fast approximate k-means",
        options=MiniBatchKMeansOptions,
    )
    register(
        "gmm",
        SklearnGMM,
        help="scikit-learn GaussianMixture (diagonal covariances), hard assignments",
        options=GMMOptions,
    )
    register(
        "agglomerative",
        SklearnAgglomerative,
        help="scikit-learn AgglomerativeClustering (ward); O(N^2) memory, seed unused",
        options=AgglomerativeOptions,
    )
    register(
        "spectral",
        SklearnSpectral,
        help="scikit-learn SpectralClustering on a 10-nearest-neighbour graph (cluster_qr)",
        options=SpectralOptions,
    )
