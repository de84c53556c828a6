"""Affinity between nearby feature-map pixels, and the random walk that spreads CAMs along it.

PSA's AffinityNet (Ahn & Kwak, CVPR 2018) predicts, for every pixel pair within a radius on a
stride-8 map, an affinity ``exp(-mean_c |f_i - f_j|)``; its random walk raises the affinities to
the power ``beta``, normalises them into a transition matrix ``T = A / colsum(A)`` and applies
``T^(2^logt)`` to the CAMs (background ``(1 - max)^alpha``), pooled to the map's resolution.

The pairs (:func:`pair_indices`) follow PSA's layout exactly: a half-neighbourhood of offsets
(``(0, 1..r-1)``, then rows ``1..r-1`` with ``dx`` in ``-(r-1)..r-1`` and ``dx^2 + dy^2 < r^2``),
"from" pixels cropped by ``r-1`` on the bottom, left and right, offset-major order.  The matrix is
symmetric with ones on the diagonal.

PSA squares a dense ``N x N`` transition matrix ``logt`` times: ``N^2`` memory (0.55 GB per
float32 copy at N = 11,750, a 1000x750 image at stride 8 or a 500x375 one at stride 4) and
``logt N^3`` work.  :func:`random_walk` applies the same ``2^logt`` steps to the CAM vectors
instead, through the sparse matrix (about ``2 x pairs + N`` non-zeros): ``x T^(2^logt)`` by
associativity, O(steps x pairs x classes) work and O(pairs) memory.  :func:`dense_random_walk` is
the float64 restatement of PSA's dense computation, the reference of the tests and benchmarks.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def pair_offsets(radius: int) -> list[tuple[int, int]]:
    """PSA's half-neighbourhood ``(dy, dx)`` offsets within ``radius`` (34 for radius 5)."""
    if radius < 2:
        raise ValueError(f"radius must be at least 2, got {radius}")
    offsets = [(0, dx) for dx in range(1, radius)]
    for dy in range(1, radius):
        for dx in range(-radius + 1, radius):
            if dx * dx + dy * dy < radius * radius:
                offsets.append((dy, dx))
    return offsets


@dataclass(frozen=True)
class PairIndex:
    """Flat "from" and "to" pixel indices of every pair on an ``h x w`` map."""

    height: int
    width: int
    radius: int
    #: ``[P]`` flat index of each pair's first pixel (offset-major: all pairs of offset 0 first).
    source: torch.Tensor
    #: ``[P]`` flat index of each pair's second pixel.
    target: torch.Tensor

    @property
    def num_offsets(self) -> int:
        """Offsets per "from" pixel."""
        return len(pair_offsets(self.radius))


def pair_indices(radius: int, size: tuple[int, int]) -> PairIndex:
    """The pairs of PSA's ``get_indices_of_pairs(radius, size)`` on an ``(h, w)`` map.

    "From" pixels are ``full[:h-(r-1), (r-1):w-(r-1)]`` (row-major); "to" pixels are those
    shifted by each offset.  A map smaller than ``2r-1`` pixels across has no pairs.
    """
    height, width = int(size[0]), int(size[1])
    crop = radius - 1
    full = torch.arange(height * width).view(height, width)
    rows, cols = height - crop, width - 2 * crop
    if rows <= 0 or cols <= 0:
        empty = torch.zeros(0, dtype=torch.long)
        return PairIndex(height, width, radius, empty, empty)
    source = full[:rows, crop:crop + cols].reshape(-1)
    targets = [full[dy:dy + rows, crop + dx:crop + dx + cols].reshape(-1) for dy, dx in pair_offsets(radius)]
    return PairIndex(height, width, radius, source.repeat(len(targets)), torch.cat(targets))


def pair_affinity(features: torch.Tensor, pairs: PairIndex) -> torch.Tensor:
    """``[P]`` affinities ``exp(-mean_c |f_source - f_target|)`` of one image's ``[C, h, w]`` map."""
    if features.ndim != 3:
        raise ValueError(f"features {tuple(features.shape)} are not one [C, h, w] map")
    return batch_pair_affinity(features.unsqueeze(0), pairs)[0]


def batch_pair_affinity(features: torch.Tensor, pairs: PairIndex) -> torch.Tensor:
    """``[B, P]`` pair affinities of a batch of ``[B, C, h, w]`` maps (differentiable)."""
    if features.ndim != 4 or tuple(features.shape[2:]) != (pairs.height, pairs.width):
        raise ValueError(f"features {tuple(features.shape)} do not match pairs on a "
                         f"{pairs.height}x{pairs.width} map")
    flat = features.reshape(features.shape[0], features.shape[1], -1)
    if pairs.source.numel() == 0:
        return flat.new_zeros(features.shape[0], 0)
    # Offset by offset: the [B, C, P] difference of all pairs at once is the memory peak otherwise.
    per_offset = pairs.source.numel() // pairs.num_offsets
    out = []
    for k in range(pairs.num_offsets):
        part = slice(k * per_offset, (k + 1) * per_offset)
        diff = flat[:, :, pairs.target[part].to(flat.device)] - flat[:, :, pairs.source[part].to(flat.device)]
        out.append(torch.exp(-diff.abs().mean(dim=1)))
    return torch.cat(out, dim=1)


def _symmetric_entries(affinity: torch.Tensor, pairs: PairIndex, beta: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Rows, columns and values of ``A^beta``: each pair both ways, ones on the diagonal."""
    n = pairs.height * pairs.width
    device = affinity.device
    diag = torch.arange(n, device=device)
    source, target = pairs.source.to(device), pairs.target.to(device)
    powered = affinity.pow(beta)
    rows = torch.cat([source, diag, target])
    cols = torch.cat([target, diag, source])
    values = torch.cat([powered, torch.ones(n, dtype=affinity.dtype, device=device), powered])
    return rows, cols, values, n


def random_walk(cams: torch.Tensor, affinity: torch.Tensor, pairs: PairIndex, beta: float = 8.0,
                logt: int = 8) -> torch.Tensor:
    """``cams`` ``[K, h, w]`` after ``2^logt`` steps of the walk on ``affinity`` (``[P]``).

    Equal, up to float rounding, to PSA's ``cams_vec @ (A^beta / colsum)^(2^logt)``; the dense
    matrix is never formed: each step is one sparse product with the ``2P + N`` entries.
    """
    if cams.ndim != 3 or tuple(cams.shape[1:]) != (pairs.height, pairs.width):
        raise ValueError(f"CAMs {tuple(cams.shape)} do not match pairs on a {pairs.height}x{pairs.width} map")
    if logt < 0:
        raise ValueError(f"logt must be >= 0, got {logt}")
    rows, cols, values, n = _symmetric_entries(affinity.to(cams.dtype), pairs, beta)
    column_sums = torch.zeros(n, dtype=cams.dtype, device=cams.device).index_add_(0, cols, values)
    # (x T)_j = sum_i x_i A_ij / s_j; with A symmetric that is (A x^T)_j / s_j: the CSR matrix
    # times the [N, K] block, then a division by the column sums.
    matrix = _csr(rows, cols, values, n)
    state = cams.reshape(cams.shape[0], n).t().contiguous()
    inverse = (1.0 / column_sums).unsqueeze(1)
    for _ in range(2 ** logt):
        state = torch.sparse.mm(matrix, state) * inverse
    return state.t().reshape(cams.shape)


def _csr(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n x n`` CSR matrix of the entries (duplicates summed)."""
    coo = torch.sparse_coo_tensor(torch.stack([rows, cols]), values, (n, n), check_invariants=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return coo.coalesce().to_sparse_csr()


def dense_random_walk(cams: torch.Tensor, affinity: torch.Tensor, pairs: PairIndex, beta: float = 8.0,
                      logt: int = 8) -> torch.Tensor:
    """PSA's dense computation in float64: ``T = A^beta / colsum``, squared ``logt`` times,
    ``cams_vec @ T``.  ``N^2`` memory: the reference for tests and benchmarks, not for use."""
    rows, cols, values, n = _symmetric_entries(affinity.to(torch.float64), pairs, beta)
    matrix = torch.zeros(n, n, dtype=torch.float64, device=cams.device)
    matrix.index_put_((rows, cols), values, accumulate=True)
    trans = matrix / matrix.sum(dim=0, keepdim=True)
    for _ in range(logt):
        trans = trans @ trans
    walked = cams.reshape(cams.shape[0], n).to(torch.float64) @ trans
    return walked.reshape(cams.shape)


def with_background(cams: torch.Tensor, alpha: float) -> torch.Tensor:
    """``[1 + n, H, W]``: the background map ``(1 - max)^alpha`` before the ``[n, H, W]`` CAMs
    (PSA; with no CAM the background is 1 everywhere)."""
    best = cams.max(dim=0).values if cams.shape[0] else cams.new_zeros(cams.shape[1:])
    return torch.cat([(1.0 - best).clamp_min(0).pow(alpha).unsqueeze(0), cams])


def pool_cams(cams: torch.Tensor, stride: int) -> torch.Tensor:
    """``[K, H, W]`` maps zero-padded to multiples of ``stride`` and average-pooled by it."""
    height, width = cams.shape[1:]
    pad_h, pad_w = (-height) % stride, (-width) % stride
    padded = F.pad(cams, (0, pad_w, 0, pad_h))
    return F.avg_pool2d(padded.unsqueeze(0), stride, stride)[0]


def walk_to_labels(walked: torch.Tensor, size: tuple[int, int], stride: int) -> torch.Tensor:
    """Argmax of walked ``[K, h, w]`` maps upsampled (bilinear) to the padded image and cropped
    to ``size`` ``(H, W)``; index ``k`` of the maps is label ``k``."""
    height, width = size
    padded = (math.ceil(height / stride) * stride, math.ceil(width / stride) * stride)
    up = F.interpolate(walked.unsqueeze(0), size=padded, mode="bilinear", align_corners=False)[0]
    return up.argmax(dim=0)[:height, :width]
