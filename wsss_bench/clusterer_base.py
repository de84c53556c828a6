"""The clusterer contract, enforced in one place for every clusterer plugin that wants it.

:class:`BaseClusterer` validates the features (2-D, real, finite), the ``k`` and ``seed``
arguments, applies the documented shortcuts (``k == 1``, ``k >= N``), checks the labels a
subclass's :meth:`BaseClusterer._cluster` returns and records :attr:`BaseClusterer.last_stats`.
Built-in and third-party clusterers subclass it; the host checks every clusterer's labels again
(:func:`wsss_bench.clustering.fit_predict`), whether it subclasses this or not.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from .errors import ConfigError, DataError

__all__ = ["BaseClusterer", "ClustererOptions", "MAX_SEED", "check_int", "validate_features",
           "within_cluster_ss"]

# numpy's legacy RandomState, which scikit-learn builds from an int seed, only accepts seeds
# in [0, 2**32); checking here gives a clear error instead of a deep numpy traceback.
MAX_SEED = 2**32 - 1


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
        k = check_int("k", k, minimum=1)
        seed = check_int("seed", seed, minimum=0, maximum=MAX_SEED)
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


def check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    # bool is an int subclass; k=True is almost certainly a config mistake.
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"clusterer {name} must be an integer, got {value!r}")
    value = int(value)
    if value < minimum or (maximum is not None and value > maximum):
        upper = "" if maximum is None else f" and <= {maximum}"
        raise ConfigError(f"clusterer {name} must be >= {minimum}{upper}, got {value}")
    return value
