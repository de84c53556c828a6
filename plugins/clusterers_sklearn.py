"""Clustering algorithms from scikit-learn, registered as wsss-bench clusterers.

SC-CAM splits the images of each parent class into ``k`` sub-categories by clustering their
image-level features (``N x D``, non-negative, ``D`` up to 4096).  Every clusterer here follows
the contract of :func:`wsss_bench.hookspecs.register_clusterers`::

    labels = clusterer.fit_predict(features, k, seed)   # int64, shape (N,), values in [0, k)
    clusterer.last_stats                                # dict describing the last call

The rules shared by all clusterers live in one place, :class:`BaseClusterer`, so a new
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

scikit-learn is imported lazily inside each clusterer: plugin modules are imported whenever the
``wsss`` command starts, and ``sklearn.cluster`` alone costs about a second to import.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from wsss_bench.errors import ConfigError, DataError
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

# numpy's legacy RandomState, which scikit-learn builds from an int seed, only accepts seeds
# in [0, 2**32); checking here gives a clear error instead of a deep numpy traceback.
_MAX_SEED = 2**32 - 1


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def validate_features(features: Any, dtype: Any = np.float64) -> np.ndarray:
    """Check ``features`` and return them as a C-contiguous ``(N, D)`` array of ``dtype``.

    Raises :class:`DataError` when the array is not 2-D, is empty, is not real-valued or has
    rows containing NaN or Inf (the message says how many rows are bad and which one is first).
    """
    array = np.asarray(features)
    if array.ndim != 2:
        raise DataError(
            f"clustering features must be a 2-D array (N images x D dims), got shape {array.shape}"
        )
    n_rows, n_dims = array.shape
    if n_rows == 0:
        raise DataError("clustering features are empty (0 rows): there is nothing to cluster")
    if n_dims == 0:
        raise DataError(f"clustering features have 0 dimensions (shape {array.shape})")
    if array.dtype == np.bool_ or not (
        np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
    ):
        raise DataError(
            f"clustering features must be real numbers (float32/float64), got dtype {array.dtype}"
        )
    # One working dtype per clusterer (float64 for scikit-learn): identical values then give
    # identical labels whatever the caller's dtype, and scikit-learn's float32 code paths
    # round differently.  Checked after the cast, so values too large for it count as Inf.
    array = np.ascontiguousarray(array, dtype=dtype)
    finite_rows = np.isfinite(array).all(axis=1)
    if not finite_rows.all():
        bad = np.flatnonzero(~finite_rows)
        raise DataError(
            f"clustering features contain NaN or Inf in {bad.size} of {n_rows} rows "
            f"(first bad row: {int(bad[0])}); fix or drop these images before clustering"
        )
    return array


def within_cluster_ss(features: np.ndarray, labels: np.ndarray) -> float:
    """Within-cluster sum of squared Euclidean distances of each row to its cluster's mean.

    This is k-means' inertia evaluated on an arbitrary partition, so every clusterer can be
    scored the same way.  Accumulated in float64, one block of rows at a time, so float32
    input is never copied whole.
    """
    features = np.asarray(features)
    labels = np.asarray(labels).reshape(-1)
    n_rows = labels.shape[0]
    if features.ndim != 2 or features.shape[0] != n_rows:
        raise ValueError(f"need (N, D) features and N labels, got {features.shape} and {n_rows}")
    if n_rows == 0:
        return 0.0
    _, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.reshape(-1)
    n_clusters = int(inverse.max()) + 1
    counts = np.bincount(inverse, minlength=n_clusters).astype(np.float64)
    # Uses sum ||x||^2 - sum_j n_j ||mean_j||^2.  That identity cancels badly when the data sit
    # far from the origin (non-negative features do), so every row is first shifted by the
    # mean of the first block, a cheap stand-in for the global mean; the result is
    # shift-invariant.
    block = max(1, min(n_rows, (1 << 21) // max(1, features.shape[1])))
    shift = np.asarray(features[:block], dtype=np.float64).mean(axis=0)
    sums = np.zeros((n_clusters, shift.shape[0]), dtype=np.float64)
    total_sq = 0.0
    for start in range(0, n_rows, block):
        # np.array copies, so the shift can be applied in place.
        rows = np.array(features[start : start + block], dtype=np.float64)
        rows -= shift
        flat = rows.reshape(-1)
        total_sq += float(flat @ flat)
        members = inverse[start : start + block]
        one_hot = np.zeros((n_clusters, rows.shape[0]), dtype=np.float64)
        one_hot[members, np.arange(rows.shape[0])] = 1.0
        sums += one_hot @ rows  # BLAS; much faster than np.add.at
    between = float(np.sum(np.einsum("ij,ij->i", sums, sums) / counts))
    return max(total_sq - between, 0.0)


class ClustererOptions(BaseModel):
    """Base of every clusterer's options model: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class BaseClusterer:
    """The one place where the clusterer contract is enforced.

    Subclasses implement :meth:`_cluster`, which only ever sees validated features of
    :attr:`work_dtype` (float64 unless a subclass computes in float32 anyway),
    ``2 <= k_eff < N`` and a checked seed.  :meth:`fit_predict` handles validation, the
    ``k > N``, ``k == 1`` and ``N == 1`` shortcuts, label dtype/shape/range checks and
    :attr:`last_stats`.
    """

    #: Registered name, used in error messages.
    name: str = "clusterer"
    #: dtype the features are converted to before :meth:`_cluster` sees them.
    work_dtype: Any = np.float64

    def __init__(self) -> None:
        self.last_stats: dict[str, Any] = {}

    def fit_predict(self, features: np.ndarray, k: int, seed: int) -> np.ndarray:
        """Cluster the rows of ``features`` (``N x D``) into at most ``k`` groups.

        Returns int64 labels of shape ``(N,)`` with values in ``[0, min(k, N))``.  The same
        features, ``k`` and ``seed`` always give the same labels.
        """
        k = _check_int("k", k, minimum=1)
        seed = _check_int("seed", seed, minimum=0, maximum=_MAX_SEED)
        x = validate_features(features, self.work_dtype)
        n_rows = x.shape[0]
        k_eff = min(k, n_rows)
        stats: dict[str, Any] = {"n_samples": n_rows, "k": k, "k_eff": k_eff}
        if k_eff == 1:
            labels = np.zeros(n_rows, dtype=np.int64)
            stats["shortcut"] = "single cluster"
        elif k_eff == n_rows:
            # Documented K >= N rule: each image is its own sub-category.
            labels = np.arange(n_rows, dtype=np.int64)
            stats["shortcut"] = "one cluster per sample"
        else:
            raw, algo_stats = self._cluster(x, k_eff, seed)
            labels = self._check_labels(raw, n_rows, k_eff)
            stats.update(algo_stats)
        stats["inertia"] = within_cluster_ss(x, labels)
        self.last_stats = stats
        return labels

    def _cluster(self, x: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
        """Run the algorithm on ``x`` with ``2 <= k < N``; return labels and stats."""
        raise NotImplementedError

    def _check_labels(self, raw: Any, n_rows: int, k_eff: int) -> np.ndarray:
        # A plugin returning malformed labels is a bug, not a user error: fail loudly here
        # rather than corrupting pseudo-labels downstream.
        labels = np.asarray(raw).reshape(-1)
        if labels.shape != (n_rows,):
            raise RuntimeError(f"{self.name}: expected {n_rows} labels, got shape {labels.shape}")
        if labels.size and (labels.min() < 0 or labels.max() >= k_eff):
            raise RuntimeError(
                f"{self.name}: labels outside [0, {k_eff}): min {labels.min()}, max {labels.max()}"
            )
        return labels.astype(np.int64, copy=False)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({getattr(self, 'options', '')!r})"


def _check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    # bool is an int subclass; k=True is almost certainly a config mistake.
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"clusterer {name} must be an integer, got {value!r}")
    value = int(value)
    if value < minimum or (maximum is not None and value > maximum):
        upper = "" if maximum is None else f" and <= {maximum}"
        raise ConfigError(f"clusterer {name} must be >= {minimum}{upper}, got {value}")
    return value


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
