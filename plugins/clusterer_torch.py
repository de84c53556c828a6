"""``torch-kmeans``: k-means in PyTorch, with every restart run in one batch.

SC-CAM's clustering step is ``KMeans(n_clusters=10, n_init=10)`` on each class's image
features.  scikit-learn runs the ten restarts one after another in float64; this version keeps
the same algorithm (greedy k-means++ seeding, then Lloyd iterations, best of ``n_init`` by
inertia) but

* runs all restarts together, so the assignment step is one large matrix product (every point
  against the ``n_init * k`` centres), which BLAS or a GPU executes far more efficiently than
  many small ones;
* keeps the cluster sums up to date with a sparse product over only the points that changed
  cluster, instead of summing all ``N`` rows again at every iteration;
* computes in float32 by default (``dtype="float64"`` is available), after centring the data
  on its mean, as scikit-learn does, so that the ``||x||^2 - 2 x.c + ||c||^2`` expansion does
  not lose the small differences between large non-negative feature vectors;
* drops restarts from the batch as soon as they converge.

Convergence follows scikit-learn: a restart stops when its labels no longer change, or when the
total squared centre shift falls below ``tol * mean(per-dimension variance)``.  Clusters that
become empty are moved onto the points farthest from their current centres.

Input checks, the ``k > N`` rule and ``last_stats`` come from
:class:`wsss_bench.clusterer_base.BaseClusterer`, shared by every clusterer.
On CPU the labels are reproducible for a given seed (on the same machine and thread count); a
CUDA run uses the same algorithm but its own random stream and rounding, so it may pick a
different (equally good) partition.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from wsss_bench.errors import ConfigError
from wsss_bench.hookspecs import hookimpl

from wsss_bench.clusterer_base import BaseClusterer, ClustererOptions

__all__ = ["TorchKMeans", "TorchKMeansOptions", "register_clusterers", "resolve_device"]


class TorchKMeansOptions(ClustererOptions):
    """Options of ``torch-kmeans`` (defaults match scikit-learn's KMeans with n_init=10)."""

    n_init: int = Field(10, ge=1, le=1000, description="independent k-means++ restarts")
    max_iter: int = Field(300, ge=1, le=100_000, description="Lloyd iterations per restart")
    tol: float = Field(1e-4, ge=0.0, le=1.0, description="centre-shift tolerance (x mean var)")
    device: str = Field(
        "auto", description="'auto' (CUDA when available, else CPU) or a torch device"
    )
    dtype: Literal["float32", "float64"] = "float32"
    n_local_trials: int | None = Field(
        None, ge=1, le=1000, description="k-means++ candidates per centre (None: 2 + ln k)"
    )

    @field_validator("device")
    @classmethod
    def _valid_device(cls, value: str) -> str:
        if value != "auto":
            try:
                torch.device(value)
            except (RuntimeError, TypeError) as error:
                raise ValueError(f"not a torch device: {value!r} ({error})") from None
        return value


def resolve_device(device: str) -> torch.device:
    """Turn ``"auto"`` into CUDA when available, else CPU; reject an unavailable CUDA device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"torch-kmeans device {device!r} requested but CUDA is not available")
    return resolved


class TorchKMeans(BaseClusterer):
    """k-means (k-means++ seeding, Lloyd iterations) in PyTorch, restarts batched together."""

    name = "torch-kmeans"

    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.options = TorchKMeansOptions(**options)
        self.device = resolve_device(self.options.device)
        self.dtype = torch.float32 if self.options.dtype == "float32" else torch.float64
        # Skip the shared wrapper's float64 copy when computing in float32 anyway: casting
        # float64 -> float32 directly rounds exactly as going through float64 would.
        self.work_dtype = np.float32 if self.options.dtype == "float32" else np.float64

    # The public entry point is BaseClusterer.fit_predict; this only sees 2 <= k < N.
    def _cluster(self, x: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
        opts = self.options
        n_restarts = opts.n_init
        # A private generator keeps the global torch RNG untouched and makes runs reproducible.
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed)

        data = torch.as_tensor(x, device=self.device).to(self.dtype)
        # Centring changes no distance but keeps the norm expansion precise in float32.
        data = data - data.mean(dim=0, keepdim=True)
        sq_norms = (data * data).sum(dim=1)
        # scikit-learn's tolerance: tol x the mean per-dimension variance, which for centred
        # data is just the mean squared entry (and avoids a slow strided variance kernel).
        tol = opts.tol * float(sq_norms.sum(dtype=torch.float64)) / data.numel()

        n_trials = opts.n_local_trials or 2 + int(math.log(k))
        centres = _kmeans_plus_plus(data, sq_norms, k, n_restarts, n_trials, generator)
        centres, n_iter = _lloyd(data, sq_norms, centres, opts.max_iter, tol)

        labels, min_dist = _assign(data, sq_norms, centres)
        inertia = min_dist.clamp_min(0).sum(dim=1, dtype=torch.float64)
        best = int(torch.argmin(inertia))
        stats = {
            "algo_inertia": float(inertia[best]),
            "n_iter": int(n_iter[best]),
            "device": str(self.device),
            "dtype": opts.dtype,
        }
        return labels[best].cpu().numpy().astype(np.int64), stats


def _assign(
    data: torch.Tensor, sq_norms: torch.Tensor, centres: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centre of every point for each restart.

    ``centres`` is ``(R, k, D)``; returns labels ``(R, N)`` and squared distances ``(R, N)``.
    One matmul covers all restarts: ``||c||^2 - 2 x.c`` ranks the centres, and ``||x||^2`` is
    added afterwards only to the minimum since it does not depend on the centre.
    """
    n_restarts, k, dim = centres.shape
    flat = centres.reshape(n_restarts * k, dim)
    scores = torch.addmm((flat * flat).sum(dim=1)[None, :], data, flat.T, alpha=-2.0)
    best_score, labels = scores.view(-1, n_restarts, k).min(dim=2)
    return labels.T.contiguous(), (best_score + sq_norms[:, None]).T.contiguous()


def _kmeans_plus_plus(
    data: torch.Tensor,
    sq_norms: torch.Tensor,
    k: int,
    n_restarts: int,
    n_trials: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Greedy k-means++ seeding for ``n_restarts`` independent restarts at once.

    Each new centre is the best (lowest resulting potential) of ``n_trials`` candidates drawn
    with probability proportional to the squared distance to the nearest chosen centre, which
    is what scikit-learn does; the greedy choice gives noticeably lower final inertia than
    plain D^2 sampling.  Returns centres ``(R, k, D)``.
    """
    n_points = data.shape[0]
    rows = torch.arange(n_restarts, device=data.device)
    chosen = torch.empty((n_restarts, k), dtype=torch.long, device=data.device)
    chosen[:, 0] = torch.randint(n_points, (n_restarts,), generator=generator, device=data.device)
    closest = _sq_dist_to_points(data, sq_norms, chosen[:, 0])  # (R, N)
    for c in range(1, k):
        weights = closest.clamp_min(0)
        # When every point coincides with a chosen centre, fall back to uniform sampling
        # (multinomial rejects all-zero rows); the duplicate centres are fixed by Lloyd.
        degenerate = weights.sum(dim=1, keepdim=True) <= 0
        weights = torch.where(degenerate, torch.ones_like(weights), weights)
        candidates = torch.multinomial(weights, n_trials, replacement=True, generator=generator)
        cand_dist = _sq_dist_to_points(data, sq_norms, candidates.reshape(-1))
        cand_dist = torch.minimum(cand_dist.view(n_restarts, n_trials, n_points), closest[:, None])
        best = cand_dist.sum(dim=2, dtype=torch.float64).argmin(dim=1)  # (R,)
        chosen[:, c] = candidates[rows, best]
        closest = cand_dist[rows, best]
    return data[chosen]


def _sq_dist_to_points(
    data: torch.Tensor, sq_norms: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """Squared distances ``(len(index), N)`` from the points ``data[index]`` to every point."""
    picked = data[index]
    dist = torch.addmm(sq_norms[None, :], picked, data.T, alpha=-2.0)
    return (dist + sq_norms[index, None]).clamp_min_(0)


#: Recompute the cluster sums from scratch at least this often, so the float32 rounding of
#: incremental updates cannot accumulate over long runs.
_FULL_UPDATE_EVERY = 16


def _lloyd(
    data: torch.Tensor, sq_norms: torch.Tensor, centres: torch.Tensor, max_iter: int, tol: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd iterations for all restarts, removing each from the batch once it converges.

    The per-cluster sums are updated incrementally: after the first iterations only a few
    points change cluster, and moving just those costs a fraction of summing all ``N`` rows
    again, so the assignment step dominates, as in any k-means.

    Returns the final centres ``(R, k, D)`` and the iteration count of each restart.
    """
    n_restarts, k, dim = centres.shape
    n_points = data.shape[0]
    device = data.device
    centres = centres.clone()
    n_iter = torch.zeros(n_restarts, dtype=torch.long)
    active = torch.arange(n_restarts, device=device)
    previous: torch.Tensor | None = None  # labels (A, N) the sums below correspond to
    sums = torch.empty((0, dim), dtype=data.dtype, device=device)
    counts = torch.empty(0, dtype=data.dtype, device=device)

    for iteration in range(max_iter):
        current = centres[active]
        n_active = current.shape[0]
        labels, min_dist = _assign(data, sq_norms, current)
        offsets = torch.arange(n_active, device=device)[:, None] * k
        targets = labels + offsets  # row of (restart, cluster) in the flattened sums

        # Cluster sums of all restarts as one sparse (A*k, N) @ dense (N, D) product: a
        # sparse product costs one row addition per non-zero, k times less than a dense
        # one-hot matmul, and after the first iterations only the few points that changed
        # cluster need moving (+1 in the new cluster, -1 in the old one).
        full_update = previous is None or iteration % _FULL_UPDATE_EVERY == 0
        if previous is not None and not full_update:
            moved = torch.nonzero(labels != previous)  # (M, 2): restart, point
            if 2 * moved.shape[0] >= labels.numel():
                full_update = True  # two entries per move: no cheaper than starting over
            elif moved.shape[0]:
                restart, point = moved[:, 0], moved[:, 1]
                rows = torch.cat([targets[restart, point], (previous + offsets)[restart, point]])
                values = torch.ones(rows.shape[0], dtype=data.dtype, device=device)
                values[moved.shape[0] :] = -1.0
                delta_sums, delta_counts = _sparse_sums(
                    data, rows, torch.cat([point, point]), values, n_active * k
                )
                sums = sums + delta_sums
                counts = counts + delta_counts
        if full_update:
            values = torch.ones(targets.numel(), dtype=data.dtype, device=device)
            point = torch.arange(n_points, device=device).repeat(n_active)
            sums, counts = _sparse_sums(data, targets.reshape(-1), point, values, n_active * k)

        updated = (sums / counts.clamp_min(1.0)[:, None]).view(n_active, k, dim)
        empty = (counts == 0).view(n_active, k)
        if bool(empty.any()):
            # Only the centres move; the sums keep describing the current labels.
            _relocate_empty(data, updated, empty, min_dist)

        shift = ((updated - current) ** 2).sum(dim=(1, 2))
        centres[active] = updated
        n_iter[active.cpu()] += 1

        unchanged = (
            (labels == previous).all(dim=1)
            if previous is not None
            else torch.zeros(n_active, dtype=torch.bool, device=device)
        )
        # A relocated centre shows up as a large shift, so it cannot pass the tolerance test;
        # unchanged labels despite an empty cluster only happen with duplicate points.
        keep = ~(unchanged | (shift <= tol))
        if not bool(keep.any()):
            break
        if not bool(keep.all()):
            active = active[keep]
            labels = labels[keep]
            sums = sums.view(n_active, k, dim)[keep].reshape(-1, dim)
            counts = counts.view(n_active, k)[keep].reshape(-1)
        previous = labels
    return centres, n_iter


def _sparse_sums(
    data: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, n_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M @ data, M.sum(1))`` for the sparse ``(n_rows, N)`` matrix ``M[rows, cols] = values``.

    Duplicate ``(row, col)`` pairs add up, as a coalesced COO matrix does.
    """
    matrix = torch.sparse_coo_tensor(
        torch.stack([rows, cols]),
        values,
        (n_rows, data.shape[0]),
        check_invariants=False,  # indices are in range by construction; skip the check
    )
    sums = torch.sparse.mm(matrix, data)
    counts = torch.zeros(n_rows, dtype=data.dtype, device=data.device).index_add_(0, rows, values)
    return sums, counts


def _relocate_empty(
    data: torch.Tensor, centres: torch.Tensor, empty: torch.Tensor, min_dist: torch.Tensor
) -> None:
    """Move each empty cluster's centre onto a point far from its current centre (in place).

    Points are taken in decreasing order of distance, a different point per empty cluster, as
    scikit-learn does; the next assignment step then gives those clusters members again.
    """
    for restart in torch.nonzero(empty.any(dim=1)).flatten().tolist():
        which = torch.nonzero(empty[restart]).flatten()
        farthest = torch.topk(min_dist[restart], int(which.numel())).indices
        centres[restart, which] = data[farthest]


@hookimpl
def register_clusterers(register: Any) -> None:
    """Register the PyTorch k-means clusterer."""
    register(
        "torch-kmeans",
        TorchKMeans,
        help="k-means in PyTorch (k-means++, n_init=10 batched restarts, float32; CPU or CUDA)",
        options=TorchKMeansOptions,
    )
