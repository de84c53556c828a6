"""The fully connected CRF (Krähenbühl & Koltun, NIPS 2011) as PSA runs it, through pydensecrf.

:func:`dense_crf` is PSA's ``tool/imutils.py`` ``crf_inference`` (scale factor 1): unary
``-log(max(score, 1e-5))`` of each label's score map (``unary_from_softmax``; the scores need not
sum to one: PSA passes ``[(1 - max)^alpha, cams]`` as they are), a Gaussian kernel on the pixel
positions (``sxy`` 3, Potts weight 3) and a bilateral one on positions and colours (``sxy`` 80,
``srgb`` 13, weight 10), both symmetrically normalised (pydensecrf's default), and ``t`` = 10
mean-field iterations; it returns the marginals ``Q``.  pydensecrf filters with the
permutohedral lattice, an approximation of the Gaussian kernels (``tests/test_crf.py`` states how
close it comes to an exact mean-field update).

pydensecrf is the optional ``[crf]`` extra (``pydensecrf2`` 1.1 builds from its sdist with g++ in
about a minute; no wheel): it is imported only when a CRF runs, and its absence is one line
(:data:`CRF_EXTRA_MESSAGE`) naming the extra.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ConfigError

#: What a user without pydensecrf is told, wherever a CRF was asked for.
CRF_EXTRA_MESSAGE = "dense CRF needs the [crf] extra: pip install 'wsss-bench[crf]'"


def _pydensecrf() -> tuple[Any, Any]:
    """pydensecrf's ``densecrf`` module and ``unary_from_softmax``, or the one-line error."""
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError:  # not installed, or an extension built against another numpy
        raise ConfigError(CRF_EXTRA_MESSAGE) from None
    return dcrf, unary_from_softmax


def crf_available() -> bool:
    """Whether pydensecrf imports (not cached, so a test can hide it)."""
    try:
        _pydensecrf()
    except ConfigError:
        return False
    return True


def require_crf() -> None:
    """Raise the one-line :class:`~wsss_bench.errors.ConfigError` when pydensecrf is missing."""
    _pydensecrf()


def crf_package() -> str:
    """``pydensecrf2 1.1``: the distribution that provides ``pydensecrf``, for protocols."""
    from importlib import metadata

    for dist in ("pydensecrf2", "pydensecrf"):
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return "pydensecrf (unknown distribution)"


def dense_crf(image: np.ndarray, probs: np.ndarray, t: int = 10, gauss_sxy: float = 3, gauss_compat: float = 3,
              bi_sxy: float = 80, bi_srgb: float = 13, bi_compat: float = 10) -> np.ndarray:
    """Marginals ``[n, H, W]`` (float32, summing to one per pixel) of the dense CRF on
    ``image`` (uint8 ``[H, W, 3]`` RGB) with unary ``-log(probs)`` (``probs`` ``[n, H, W]``);
    defaults: PSA's ``crf_inference``."""
    dcrf, unary_from_softmax = _pydensecrf()
    pixels = np.asarray(image)
    scores = np.asarray(probs, np.float32)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"dense_crf needs a uint8 [H, W, 3] image, got {pixels.dtype} {pixels.shape}")
    if scores.ndim != 3 or scores.shape[0] < 1 or scores.shape[1:] != pixels.shape[:2]:
        raise ValueError(f"dense_crf: scores {scores.shape} do not fit the {pixels.shape[1]}x{pixels.shape[0]} image")
    n, height, width = scores.shape
    if n == 1:  # one label: its marginal is 1 everywhere (pydensecrf agrees; no need to build it)
        return np.ones_like(scores)
    crf = dcrf.DenseCRF2D(width, height, n)
    # pydensecrf reads the buffers as they are: C order, float32 unaries, uint8 pixels; its
    # memoryview refuses read-only arrays (an image from PIL is one), hence the copy (PSA's np.copy)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(scores)))
    crf.addPairwiseGaussian(sxy=gauss_sxy, compat=gauss_compat)
    crf.addPairwiseBilateral(sxy=bi_sxy, srgb=bi_srgb, rgbim=np.array(pixels, np.uint8, order="C", copy=True),
                             compat=bi_compat)
    marginals = np.array(crf.inference(int(t)), dtype=np.float32)
    return marginals.reshape(n, height, width)
