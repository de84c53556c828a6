"""Conformance tests for every registered clusterer, plus torch-kmeans specifics.

The clusterers are collected by calling each plugin module's ``register_clusterers`` hook with a
recording ``register`` function, so a clusterer added to those modules is covered by the
conformance tests without touching this file.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import BaseModel, ValidationError
from sklearn.metrics import adjusted_rand_score

from wsss_bench.errors import ConfigError, DataError

PLUGIN_MODULES = ("clusterers_sklearn", "clusterer_torch")

# Expected on the tiny, deliberately degenerate inputs below (separate blobs give a disconnected
# neighbour graph; duplicate rows give fewer distinct points than clusters).
pytestmark = [
    pytest.mark.filterwarnings("ignore:Graph is not fully connected:UserWarning"),
    pytest.mark.filterwarnings(
        "ignore:Number of distinct clusters:sklearn.exceptions.ConvergenceWarning"
    ),
]


def _import_plugin(name: str) -> ModuleType:
    """Import ``wsss_bench_plugins.NAME``, or ``plugins.NAME`` from a checkout not pip-installed."""
    if importlib.util.find_spec("wsss_bench_plugins") is not None:
        return importlib.import_module(f"wsss_bench_plugins.{name}")
    repo_root = str(Path(__file__).resolve().parents[1])
    if repo_root not in sys.path:
        sys.path.insert(0, repo_root)
    return importlib.import_module(f"plugins.{name}")


@dataclass(frozen=True)
class Registered:
    """One ``register(...)`` call as recorded from a plugin module."""

    name: str
    factory: Callable[..., Any]
    help: str
    options: type[BaseModel] | None


def _collect() -> dict[str, Registered]:
    found: dict[str, Registered] = {}

    def register(
        name: str, factory: Callable[..., Any], help: str = "", options: Any = None
    ) -> None:
        assert name not in found, f"clusterer {name!r} registered twice"
        found[name] = Registered(name, factory, help, options)

    for module_name in PLUGIN_MODULES:
        _import_plugin(module_name).register_clusterers(register=register)
    return found


SKLEARN = _import_plugin("clusterers_sklearn")
TORCH = _import_plugin("clusterer_torch")
CLUSTERERS = _collect()
NAMES = sorted(CLUSTERERS)


def make(name: str, **options: Any) -> Any:
    """Instantiate a registered clusterer the way the host does: validate, then call factory."""
    entry = CLUSTERERS[name]
    validated = entry.options(**options).model_dump() if entry.options is not None else options
    return entry.factory(**validated)


def blobs(n_per_blob: int = 30, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three well-separated, non-negative gaussian blobs and their true labels."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0.0, 10.0, size=(3, dim))
    centres[1] += 12.0
    centres[2, : dim // 2] += 24.0
    truth = np.repeat(np.arange(3), n_per_blob)
    features = centres[truth] + rng.normal(0.0, 0.5, size=(truth.size, dim))
    return np.maximum(features, 0.0).astype(np.float32), truth


def overlapping_blobs(n: int, dim: int, n_centres: int, seed: int) -> np.ndarray:
    """Non-negative mixture with overlapping components, where k-means restarts matter."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 2.0, size=(n_centres, dim))
    weights = rng.dirichlet(np.full(n_centres, 2.0))
    member = rng.choice(n_centres, size=n, p=weights)
    return np.maximum(centres[member] + rng.normal(0.0, 1.5, size=(n, dim)), 0.0).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------


def test_expected_clusterers_registered() -> None:
    assert {
        "kmeans",
        "minibatch-kmeans",
        "gmm",
        "agglomerative",
        "spectral",
        "torch-kmeans",
    } <= set(NAMES)


# --------------------------------------------------------------------------------------------
# Conformance: every registered clusterer
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_help_and_options_model(name: str) -> None:
    entry = CLUSTERERS[name]
    assert isinstance(entry.help, str) and entry.help.strip()
    assert entry.options is not None and issubclass(entry.options, BaseModel)
    defaults = entry.options()
    assert entry.factory(**defaults.model_dump()) is not None
    with pytest.raises(ValidationError):
        entry.options(no_such_option=1)
    with pytest.raises(ValidationError):
        entry.factory(no_such_option=1)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("k", [3, 5])
def test_labels_contract(name: str, k: int) -> None:
    features, _ = blobs()
    clusterer = make(name)
    labels = clusterer.fit_predict(features, k, 0)
    assert isinstance(labels, np.ndarray)
    assert labels.dtype == np.int64
    assert labels.shape == (features.shape[0],)
    assert labels.min() >= 0 and labels.max() < k
    stats = clusterer.last_stats
    assert stats["k"] == k and stats["k_eff"] == k and stats["n_samples"] == features.shape[0]
    assert stats["inertia"] >= 0.0


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_labels(name: str) -> None:
    features = overlapping_blobs(200, 8, 6, seed=1)
    first = make(name).fit_predict(features, 4, 7)
    again = make(name).fit_predict(features, 4, 7)
    np.testing.assert_array_equal(first, again)


@pytest.mark.parametrize("name", NAMES)
def test_input_dtype_does_not_change_labels(name: str) -> None:
    features = overlapping_blobs(120, 8, 4, seed=2)
    as_float32 = make(name).fit_predict(features, 4, 0)
    as_float64 = make(name).fit_predict(features.astype(np.float64), 4, 0)
    np.testing.assert_array_equal(as_float32, as_float64)


@pytest.mark.parametrize("name", NAMES)
def test_separates_well_separated_blobs(name: str) -> None:
    features, truth = blobs()
    labels = make(name).fit_predict(features, 3, 0)
    assert adjusted_rand_score(truth, labels) > 0.9


@pytest.mark.parametrize("name", NAMES)
def test_k_larger_than_n_gives_one_cluster_per_sample(name: str) -> None:
    features, _ = blobs()
    clusterer = make(name)
    labels = clusterer.fit_predict(features[:4], 10, 0)
    np.testing.assert_array_equal(labels, np.arange(4))
    assert labels.dtype == np.int64
    assert clusterer.last_stats["k_eff"] == 4


@pytest.mark.parametrize("name", NAMES)
def test_k_just_below_n(name: str) -> None:
    # k_eff = k < N with very few points: the algorithm runs at its limits (spectral's
    # neighbour count, GMM's samples per component).
    features, _ = blobs()
    labels = make(name).fit_predict(features[::7], 10, 0)  # 13 rows
    assert labels.shape == (13,) and labels.dtype == np.int64
    assert labels.min() >= 0 and labels.max() < 10


@pytest.mark.parametrize("name", NAMES)
def test_single_row_and_single_cluster(name: str) -> None:
    features, _ = blobs()
    np.testing.assert_array_equal(make(name).fit_predict(features[:1], 10, 0), [0])
    single = make(name).fit_predict(features, 1, 0)
    assert single.dtype == np.int64 and not single.any()


@pytest.mark.parametrize("name", NAMES)
def test_duplicate_rows_do_not_crash(name: str) -> None:
    # Fewer distinct points than clusters: k-means must re-seed empty clusters, etc.
    features = np.repeat(np.eye(3, 5, dtype=np.float32), 8, axis=0)
    labels = make(name).fit_predict(features, 5, 0)
    assert labels.shape == (24,) and labels.min() >= 0 and labels.max() < 5


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_features_raise_data_error(name: str, bad: float) -> None:
    features, _ = blobs()
    features = features.copy()
    features[[3, 17], 2] = bad
    with pytest.raises(DataError, match=r"NaN or Inf in 2 of 90 rows \(first bad row: 3\)"):
        make(name).fit_predict(features, 3, 0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "features",
    [np.zeros((0, 8), np.float32), np.zeros(8, np.float32), np.zeros((2, 3, 4), np.float32)],
    ids=["empty", "1-d", "3-d"],
)
def test_malformed_features_raise_data_error(name: str, features: np.ndarray) -> None:
    with pytest.raises(DataError):
        make(name).fit_predict(features, 3, 0)


@pytest.mark.parametrize("name", NAMES)
def test_invalid_k_and_seed_raise_config_error(name: str) -> None:
    features, _ = blobs()
    with pytest.raises(ConfigError):
        make(name).fit_predict(features, 0, 0)
    with pytest.raises(ConfigError):
        make(name).fit_predict(features, 3, -1)


# --------------------------------------------------------------------------------------------
# Shared helpers and per-algorithm options
# --------------------------------------------------------------------------------------------


def test_within_cluster_ss_matches_direct_computation() -> None:
    rng = np.random.default_rng(0)
    features = rng.normal(100.0, 1.0, size=(500, 7))
    labels = rng.integers(0, 4, size=500) * 3  # gaps in the label values are fine
    direct = sum(
        float(((features[labels == j] - features[labels == j].mean(0)) ** 2).sum())
        for j in np.unique(labels)
    )
    assert SKLEARN.within_cluster_ss(features, labels) == pytest.approx(direct, rel=1e-9)


def test_kmeans_defaults_match_sc_cam() -> None:
    options = SKLEARN.KMeansOptions()
    assert (options.n_init, options.max_iter, options.tol, options.init) == (
        10,
        300,
        1e-4,
        "k-means++",
    )


@pytest.mark.parametrize(
    "model, bad",
    [
        ("KMeansOptions", {"n_init": 0}),
        ("KMeansOptions", {"tol": -1.0}),
        ("MiniBatchKMeansOptions", {"batch_size": 0}),
        ("GMMOptions", {"covariance_type": "banana"}),
        ("GMMOptions", {"reg_covar": 0.0}),
        ("AgglomerativeOptions", {"linkage": "ward", "metric": "cosine"}),
        ("SpectralOptions", {"n_neighbors": 0}),
        ("SpectralOptions", {"assign_labels": "nope"}),
    ],
)
def test_options_ranges_are_validated(model: str, bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        getattr(SKLEARN, model)(**bad)


def test_agglomerative_non_ward_linkage_runs() -> None:
    features, truth = blobs()
    labels = make("agglomerative", linkage="average", metric="cosine").fit_predict(features, 3, 0)
    assert labels.shape == truth.shape


# --------------------------------------------------------------------------------------------
# torch-kmeans
# --------------------------------------------------------------------------------------------


def test_torch_kmeans_inertia_close_to_sklearn() -> None:
    from sklearn.cluster import KMeans

    # On overlapping data the best of 10 restarts is itself a random draw: scikit-learn with
    # another random_state lands up to ~1.5% away on single runs.  Comparing totals over a
    # few seeds tests the algorithm rather than the luck of one seed.
    ours = theirs = 0.0
    for seed in range(4):
        features = overlapping_blobs(1000, 48, 14, seed=seed)
        reference = KMeans(n_clusters=10, n_init=10, random_state=seed).fit_predict(features)
        theirs += SKLEARN.within_cluster_ss(features, reference)
        clusterer = make("torch-kmeans")
        labels = clusterer.fit_predict(features, 10, seed)
        ours += clusterer.last_stats["inertia"]
        assert len(np.unique(labels)) == 10
    assert ours <= 1.01 * theirs


def test_torch_kmeans_float64_option_agrees() -> None:
    features = overlapping_blobs(600, 32, 8, seed=3)
    single = make("torch-kmeans").fit_predict(features, 6, 0)
    double = make("torch-kmeans", dtype="float64").fit_predict(features, 6, 0)
    assert adjusted_rand_score(single, double) > 0.95


def test_torch_kmeans_more_restarts_never_worse() -> None:
    features = overlapping_blobs(800, 16, 12, seed=4)
    one = make("torch-kmeans", n_init=1)
    many = make("torch-kmeans", n_init=10)
    one.fit_predict(features, 8, 0)
    many.fit_predict(features, 8, 0)
    # Restart 0 of the batched run is not the same draw as n_init=1, so allow float slack.
    assert many.last_stats["algo_inertia"] <= one.last_stats["algo_inertia"] * 1.001


def test_torch_kmeans_device_option() -> None:
    assert TORCH.resolve_device("cpu").type == "cpu"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert TORCH.resolve_device("auto").type == expected
    with pytest.raises(ValidationError):
        TORCH.TorchKMeansOptions(device="not-a-device")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            make("torch-kmeans", device="cuda")


def test_torch_kmeans_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make("torch-kmeans").fit_predict(overlapping_blobs(100, 8, 3, seed=5), 3, 0)
    assert torch.equal(torch.rand(3), expected)


def test_torch_kmeans_matches_sklearn_inertia_on_large_features() -> None:
    # Quality only: the speed-up is measured by benchmarks/clustering.py, not asserted here.
    from sklearn.cluster import KMeans

    ours = theirs = 0.0
    for seed in range(3):
        features = overlapping_blobs(3000, 1024, 12, seed=6 + seed)
        reference = KMeans(n_clusters=10, n_init=10, random_state=seed).fit_predict(
            features.astype(np.float64)
        )
        theirs += SKLEARN.within_cluster_ss(features, reference)
        clusterer = make("torch-kmeans")
        clusterer.fit_predict(features, 10, seed)
        ours += clusterer.last_stats["inertia"]
    assert ours <= 1.01 * theirs
