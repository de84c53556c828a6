#!/usr/bin/env python
"""Benchmark every registered clusterer on synthetic, VOC-sized SC-CAM features.

SC-CAM clusters, for each of the 20 PASCAL VOC classes, the image-level features of the
training images containing that class (16,458 image-class pairs over 10,582 images, 4,096-dim
features) into K=10 sub-categories.  This script rebuilds that workload with synthetic
features of the same shape, runs each clusterer on every class and prints:

* wall time for all classes,
* total inertia (within-cluster sum of squares of the returned partition, the same measure for
  every algorithm) relative to scikit-learn ``KMeans(n_init=10)``, the SC-CAM original,
* the threads used by torch and by the native libraries (threadpoolctl).

Usage::

    python benchmarks/clustering.py --quick        # ~10% of the rows, 512 dims, no slow ones
    python benchmarks/clustering.py                # full size, every clusterer (minutes)
    python benchmarks/clustering.py --only kmeans torch-kmeans
    python benchmarks/clustering.py --scaling --quick   # time vs N and K (k-means, torch-kmeans)
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

# Per-class counts of VOC 2012 train_aug images containing each class (SC-CAM's clusters).
VOC_CLASS_SIZES: dict[str, int] = {
    "aeroplane": 590, "bicycle": 504, "bird": 705, "boat": 468, "bottle": 714,
    "bus": 393, "car": 1150, "cat": 1005, "chair": 1228, "cow": 267,
    "diningtable": 613, "dog": 1188, "horse": 445, "motorbike": 492, "person": 4155,
    "pottedplant": 522, "sheep": 300, "sofa": 649, "train": 503, "tvmonitor": 567,
}  # fmt: skip

#: Clusterers whose cost grows as N^2 (or worse); ``--quick`` leaves them out.
SLOW_CLUSTERERS = frozenset({"agglomerative", "spectral"})

PLUGIN_MODULES = ("clusterers_sklearn", "clusterer_torch")
REFERENCE = "kmeans"


def import_plugin_modules() -> list[ModuleType]:
    """Import the clusterer plugin modules, from the installed package or from this checkout."""
    repo_root = Path(__file__).resolve().parents[1]
    try:
        importlib.import_module("wsss_bench.errors")
    except ImportError:
        sys.path.insert(0, str(repo_root))
    try:
        importlib.import_module("wsss_bench_plugins")
        package = "wsss_bench_plugins"
    except ImportError:
        # Not pip-installed: the plugins/ folder is importable as "plugins" from the repo root.
        if str(repo_root) not in sys.path:
            sys.path.insert(0, str(repo_root))
        package = "plugins"
    return [importlib.import_module(f"{package}.{name}") for name in PLUGIN_MODULES]


def collect_clusterers() -> dict[str, tuple[Callable[..., Any], Any, str]]:
    """``{name: (factory, options_model, help)}`` from each module's ``register_clusterers``."""
    found: dict[str, tuple[Callable[..., Any], Any, str]] = {}

    def register(
        name: str, factory: Callable[..., Any], help: str = "", options: Any = None
    ) -> None:
        if name in found:
            raise RuntimeError(f"clusterer {name!r} registered twice")
        found[name] = (factory, options, help)

    for module in import_plugin_modules():
        module.register_clusterers(register=register)
    return found


def make_class_features(
    n_rows: int, dim: int, class_index: int, seed: int = 0, rank: int = 48
) -> np.ndarray:
    """Synthetic pooled-CNN-like features for one class: ``(n_rows, dim)`` float32, >= 0.

    A class has 6-14 latent sub-categories of unequal sizes (Dirichlet weights), drawn as a
    gaussian mixture in a ``rank``-dimensional subspace, mapped to ``dim`` dimensions by a basis
    shared by all classes, plus per-dimension noise, then passed through a ReLU as the last
    layer of a ResNet does.  Sub-categories overlap, so k-means restarts do matter.
    """
    basis_rng = np.random.default_rng(seed)  # same basis for every class, like one backbone
    basis = basis_rng.standard_normal((rank, dim)) / np.sqrt(rank)
    rng = np.random.default_rng([seed, class_index + 1])
    class_centre = rng.normal(0.0, 1.5, size=rank)
    n_sub = int(rng.integers(6, 15))
    sub_centres = class_centre + rng.normal(0.0, 1.0, size=(n_sub, rank))
    weights = rng.dirichlet(np.full(n_sub, 1.5))
    assignment = rng.choice(n_sub, size=n_rows, p=weights)
    latent = sub_centres[assignment] + rng.normal(0.0, 0.7, size=(n_rows, rank))
    features = latent @ basis - 0.3 + rng.normal(0.0, 0.5, size=(n_rows, dim))
    return np.maximum(features, 0.0).astype(np.float32)


def thread_report() -> str:
    """One line describing the threads torch and the native BLAS/OpenMP libraries use."""
    parts = []
    try:
        import torch

        parts.append(f"torch {torch.__version__}: {torch.get_num_threads()} intra-op threads")
    except ImportError:  # pragma: no cover - torch is a hard dependency of wsss-bench
        parts.append("torch not installed")
    try:
        from threadpoolctl import threadpool_info

        for info in threadpool_info():
            name = info.get("internal_api", "?")
            library = Path(info.get("filepath", "")).name
            parts.append(f"{name} ({library}): {info.get('num_threads')} threads")
    except ImportError:
        parts.append("threadpoolctl not installed")
    return "; ".join(parts)


def run_benchmark(args: argparse.Namespace) -> int:
    """Generate the data, run the selected clusterers and print the table."""
    # Spectral clustering warns for every class whose k-NN graph is disconnected, which the
    # synthetic sub-categories often are; it would bury the table.
    warnings.filterwarnings("ignore", message="Graph is not fully connected")
    clusterers = collect_clusterers()
    names = list(args.only) if args.only else list(clusterers)
    unknown = [name for name in names if name not in clusterers]
    if unknown:
        print(f"unknown clusterer(s): {', '.join(unknown)}; known: {', '.join(clusterers)}")
        return 2
    if args.quick and not args.only:
        names = [name for name in names if name not in SLOW_CLUSTERERS]
    names = [name for name in names if name not in set(args.skip)]
    if REFERENCE in names:  # listed first in the table
        names.remove(REFERENCE)
        names.insert(0, REFERENCE)

    sizes = {c: max(args.k + 1, round(n * args.row_fraction)) for c, n in VOC_CLASS_SIZES.items()}
    t0 = time.perf_counter()
    data = {
        c: make_class_features(n, args.dim, i, args.seed) for i, (c, n) in enumerate(sizes.items())
    }
    print(
        f"data: {sum(sizes.values())} rows x {args.dim} dims over {len(sizes)} classes, "
        f"K={args.k}, seed={args.seed} (generated in {time.perf_counter() - t0:.1f} s)"
    )
    print(f"threads: {thread_report()}")
    print(f"load average at start: {_load_average()}")
    print()

    runs: dict[str, Any] = {name: clusterers[name][0]() for name in names}
    if args.with_f32_baseline:
        # scikit-learn fed float32 directly (the registered "kmeans" converts to float64):
        # shows how much of torch-kmeans' lead is just single precision.
        score = import_plugin_modules()[0].within_cluster_ss
        runs["sklearn-f32 (ref)"] = _RawSklearnKMeans(np.float32, score)

    # Classes in the outer loop and clusterers interleaved inside it: on a shared machine the
    # background load then falls on every clusterer alike, and the minimum over repeats of each
    # (class, clusterer) run is the measurement least disturbed by it.
    seconds = {name: 0.0 for name in runs}
    inertia: dict[str, dict[str, float]] = {name: {} for name in runs}
    n_iter: dict[str, list[int]] = {name: [] for name in runs}
    for cls, features in data.items():
        line = []
        for name, clusterer in runs.items():
            best = float("inf")
            for _ in range(args.repeat):
                start = time.perf_counter()
                clusterer.fit_predict(features, args.k, args.seed)
                best = min(best, time.perf_counter() - start)
            seconds[name] += best
            stats = getattr(clusterer, "last_stats", {}) or {}  # deterministic: any run will do
            inertia[name][cls] = float(stats.get("inertia", float("nan")))
            if "n_iter" in stats:
                n_iter[name].append(int(stats["n_iter"]))
            line.append(f"{name} {best:.2f}s")
        if args.verbose:
            print(f"  {cls:<12} n={len(features):<5} " + ", ".join(line), flush=True)

    header = (
        f"{'clusterer':<18} {'time (s)':>9} {'speed-up':>9} {'inertia/kmeans':>15}"
        f" {'worst class':>12}  notes"
    )
    print(header)
    print("-" * len(header))
    reference = inertia.get(REFERENCE)
    for name in runs:
        if reference is not None:
            ratio = f"{sum(inertia[name].values()) / sum(reference.values()):.5f}"
            worst = f"{max(inertia[name][c] / reference[c] for c in data):.4f}"
            speed_up = f"{seconds[REFERENCE] / seconds[name]:.1f}x"
        else:
            ratio = worst = speed_up = "n/a"
        notes = f"mean n_iter {np.mean(n_iter[name]):.1f}" if n_iter[name] else ""
        print(f"{name:<18} {seconds[name]:>9.2f} {speed_up:>9} {ratio:>15} {worst:>12}  {notes}")
    # Other processes inflate the times (OpenMP code by several times on 2 busy cores): say so.
    print(f"load average at end: {_load_average()}")
    return 0


def _load_average() -> str:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg()) + f" on {os.cpu_count()} CPUs"
    except OSError:  # pragma: no cover - not available on every platform
        return "unknown"


class _RawSklearnKMeans:
    """``sklearn.cluster.KMeans`` exactly as SC-CAM called it, on features of a chosen dtype."""

    def __init__(self, dtype: Any, score: Callable[[np.ndarray, np.ndarray], float]) -> None:
        self.dtype = dtype
        self.score = score  # the plugins' within_cluster_ss, so inertias are comparable
        self.last_stats: dict[str, Any] = {}

    def fit_predict(self, features: np.ndarray, k: int, seed: int) -> np.ndarray:
        from sklearn.cluster import KMeans

        x = np.ascontiguousarray(features, dtype=self.dtype)
        model = KMeans(
            n_clusters=min(k, len(x)), n_init=10, max_iter=300, tol=1e-4, random_state=seed
        )
        labels = model.fit_predict(x)
        self.last_stats = {"inertia": self.score(x, labels), "n_iter": int(model.n_iter_)}
        return labels


def run_scaling(args: argparse.Namespace) -> int:
    """How wall time grows with N (rows of one class) and with K, for the reference k-means
    and the device k-means: two small tables."""
    clusterers = collect_clusterers()
    names = list(args.only) if args.only else [REFERENCE, "torch-kmeans"]

    def seconds(name: str, features: np.ndarray, k: int) -> float:
        factory, _, _ = clusterers[name]
        model = factory()
        best = float("inf")
        for _ in range(max(1, args.repeat)):
            start = time.perf_counter()
            model.fit_predict(features, k, args.seed)
            best = min(best, time.perf_counter() - start)
        return best

    print(f"{thread_report()}; {args.dim} dims")
    warm = make_class_features(200, args.dim, 1, args.seed)
    for name in names:  # first calls pay for library set-up (thread pools, kernels)
        clusterers[name][0]().fit_predict(warm, 4, args.seed)
    base_n, base_k = 2000, args.k
    print(f"\nK = {base_k}, growing N\n")
    print("| N | " + " | ".join(f"{n} (s)" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    for n in (500, 1000, 2000, 4000):
        feats = make_class_features(n, args.dim, 0, args.seed)
        print(f"| {n} | " + " | ".join(f"{seconds(name, feats, base_k):.2f}" for name in names) + " |")
    print(f"\nN = {base_n}, growing K\n")
    print("| K | " + " | ".join(f"{n} (s)" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    feats = make_class_features(base_n, args.dim, 0, args.seed)
    for k in (5, 10, 20, 40):
        print(f"| {k} | " + " | ".join(f"{seconds(name, feats, k):.2f}" for name in names) + " |")
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="10%% of the rows, 512 dims, skip the slow (N^2) clusterers",
    )
    parser.add_argument("--dim", type=int, default=None, help="feature dimension (default 4096)")
    parser.add_argument(
        "--row-fraction",
        type=float,
        default=None,
        help="fraction of each class's rows to generate (default 1.0)",
    )
    parser.add_argument("--k", type=int, default=10, help="clusters per class (default 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--only",
        nargs="+",
        default=None,
        metavar="NAME",
        help="run only these clusterers (slow ones included even with --quick)",
    )
    parser.add_argument("--skip", nargs="+", default=[], metavar="NAME")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="time each (class, clusterer) run this many times and keep the fastest",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="print per-class times")
    parser.add_argument("--scaling", action="store_true",
                        help="time k-means and torch-kmeans for growing N and K instead (one class)")
    parser.add_argument(
        "--with-f32-baseline",
        action="store_true",
        help="also time sklearn KMeans on float32 input (not a registered clusterer)",
    )
    args = parser.parse_args(argv)
    if args.dim is None:
        args.dim = 512 if args.quick else 4096
    if args.row_fraction is None:
        args.row_fraction = 0.1 if args.quick else 1.0
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    return run_scaling(args) if args.scaling else run_benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
