"""The dense CRF: :func:`~wsss_bench.engine.dense_crf.dense_crf` against an exact brute-force mean
field written here in numpy, the ``crf`` refiner through the host and the conformance kit,
AffinityNet's CRF labels (PSA's ``infer_cls.py`` + ``VOC12AffDataset``), and the one-line error
without the ``[crf]`` extra (simulated by hiding pydensecrf, so it runs everywhere).

The reference (:func:`mean_field_reference`) is the model pydensecrf implements, computed exactly
on images of at most 16x16 pixels: kernels ``k_g = exp(-|p_i - p_j|^2 / (2 sxy_g^2))`` and
``k_b = exp(-|p_i - p_j|^2 / (2 sxy_b^2) - |I_i - I_j|^2 / (2 srgb^2))``, each normalised
symmetrically (``D^-1/2 K D^-1/2``, ``D`` its row sums: pydensecrf's default
``NORMALIZE_SYMMETRIC``), Potts compatibility (``PottsCompatibility(w)`` adds ``w * (K Q)(l)`` to
label ``l``'s logit; the textbook ``-w * sum_{l' != l} (K Q)(l')`` differs by a per-pixel
constant, which the softmax drops), ``Q`` started at ``softmax(-unary)``, ``unary = -log(max(p,
1e-5))``.  The pixel itself stays in ``K`` and ``D``: densecrf's lattice filter includes it (the
paper's sum excludes ``j = i``; with it excluded the reference is 2-3x further from pydensecrf).
pydensecrf's permutohedral lattice approximates the Gaussians, so the comparison has tolerances:
on a piecewise-coloured image with PSA's parameters the labels agree on >= 99 % of the pixels
(measured: all) and the marginals within 1e-3 on average (measured ~1e-5, 7e-4 at most); on an
unsaturated case (smooth colours, weak kernels, 5 iterations, marginals around 0.6) within 0.006
on average (measured <= 0.003) and 0.04 at most (measured <= 0.02).  Each case asserts that the
CRF moves the marginals and labels far more than the tolerance, so a wrong wrapper fails.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from wsss_bench.cli.main import cli
from wsss_bench.engine.dense_crf import CRF_EXTRA_MESSAGE, crf_available
from wsss_bench.errors import ConfigError
from wsss_bench.evaluation.camfiles import write_cam

PSA = dict(t=10, gauss_sxy=3, gauss_compat=3, bi_sxy=80, bi_srgb=13, bi_compat=10)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=0, keepdims=True))
    return shifted / shifted.sum(axis=0, keepdims=True)


def mean_field_reference(image: np.ndarray, probs: np.ndarray, t: int = 10, gauss_sxy: float = 3,
                         gauss_compat: float = 3, bi_sxy: float = 80, bi_srgb: float = 13,
                         bi_compat: float = 10) -> np.ndarray:
    """Exact (float64, dense ``N x N`` kernels) mean field of the model in the module docstring."""
    n, h, w = probs.shape
    assert h * w <= 256, "the reference is for images of at most 16x16 pixels"
    yy, xx = np.mgrid[0:h, 0:w]
    pos = np.stack([xx.ravel(), yy.ravel()], axis=1).astype(np.float64)
    rgb = image.reshape(-1, 3).astype(np.float64)
    d_pos = ((pos[:, None, :] - pos[None, :, :]) ** 2).sum(-1)
    d_rgb = ((rgb[:, None, :] - rgb[None, :, :]) ** 2).sum(-1)
    kernels = []
    for weight, kernel in ((gauss_compat, np.exp(-d_pos / (2 * gauss_sxy ** 2))),
                           (bi_compat, np.exp(-d_pos / (2 * bi_sxy ** 2) - d_rgb / (2 * bi_srgb ** 2)))):
        scale = 1.0 / np.sqrt(kernel.sum(axis=1))
        kernels.append((weight, scale[:, None] * kernel * scale[None, :]))
    unary = -np.log(np.clip(probs.reshape(n, -1).astype(np.float64), 1e-5, 1.0))
    q = _softmax(-unary)
    for _ in range(t):
        message = sum(weight * (q @ kernel) for weight, kernel in kernels)   # kernels are symmetric
        q = _softmax(-unary + message)
    return q.reshape(n, h, w)


def piecewise_case(seed: int, h: int = 12, w: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three colour regions (a slanted edge and a thin bar) and a noisy unary: 30 % of the pixels
    favour a random label, so the CRF has labels to correct.  Not square, so a swapped width and
    height shows."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    region = np.zeros((h, w), np.int64)
    region[(xx + yy // 2) >= 9] = 1
    region[2:10, 3:5] = 2
    palette = np.array([[190, 60, 50], [70, 80, 190], [60, 170, 70]])
    image = np.clip(palette[region] + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)
    favoured = region.copy()
    flip = rng.random((h, w)) < 0.3
    favoured[flip] = rng.integers(0, 3, int(flip.sum()))
    probs = rng.uniform(0.15, 0.35, (3, h, w))
    np.put_along_axis(probs, favoured[None], rng.uniform(0.4, 0.6, (1, h, w)), axis=0)
    probs /= probs.sum(axis=0, keepdims=True)
    return image, probs.astype(np.float32), region


def smooth_case(seed: int, h: int = 16, w: int = 14) -> tuple[np.ndarray, np.ndarray]:
    """Colour gradients with noise and a noisy unary: no edge for the CRF to snap to, so its
    marginals stay soft and compare as numbers."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([xx * 255 / (w - 1), yy * 255 / (h - 1), 128 + 60 * np.sin(xx / 3)], axis=-1)
    image = np.clip(image + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    logits = rng.normal(0, 1.0, (3, h, w))
    logits[0] += 0.8 * xx / w
    logits[1] += 0.8 * yy / h
    return image, _softmax(logits).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dense_crf_matches_exact_mean_field_with_psa_parameters(seed: int) -> None:
    pytest.importorskip("pydensecrf")
    from wsss_bench.engine.dense_crf import dense_crf

    image, probs, region = piecewise_case(seed)
    ours = dense_crf(image, probs)                               # PSA's defaults
    assert ours.shape == probs.shape and ours.dtype == np.float32
    np.testing.assert_allclose(ours.sum(axis=0), 1.0, atol=1e-4)
    exact = mean_field_reference(image, probs, **PSA)
    agreement = (ours.argmax(0) == exact.argmax(0)).mean()
    assert agreement >= 0.99, agreement
    assert np.abs(ours - exact).mean() <= 1e-3
    # ...and the case is not trivial: the CRF relabels a good share of the unary's argmax (to
    # the colour regions), far more than the 1 % tolerance
    changed = (ours.argmax(0) != probs.argmax(0)).mean()
    assert changed >= 0.1, changed
    assert (ours.argmax(0) == region).mean() >= 0.99


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dense_crf_marginals_match_exact_mean_field_when_soft(seed: int) -> None:
    pytest.importorskip("pydensecrf")
    from wsss_bench.engine.dense_crf import dense_crf

    image, probs = smooth_case(seed)
    params = dict(t=5, gauss_sxy=3, gauss_compat=1, bi_sxy=5, bi_srgb=30, bi_compat=1)
    ours = dense_crf(image, probs, **params)
    exact = mean_field_reference(image, probs, **params)
    assert np.abs(ours - exact).mean() <= 0.006
    assert np.abs(ours - exact).max() <= 0.04
    moved = np.abs(exact - probs).mean()                        # what the pairwise terms did
    assert moved >= 0.03, moved                                 # >= 5x the tolerance
    assert (exact.argmax(0) != probs.argmax(0)).mean() >= 0.05


def test_dense_crf_rejects_mismatched_inputs() -> None:
    pytest.importorskip("pydensecrf")
    from wsss_bench.engine.dense_crf import dense_crf

    with pytest.raises(ValueError, match="do not fit"):
        dense_crf(np.zeros((4, 5, 3), np.uint8), np.ones((2, 5, 4), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        dense_crf(np.zeros((4, 5, 3), np.float32), np.ones((2, 4, 5), np.float32))
    assert np.array_equal(dense_crf(np.zeros((4, 5, 3), np.uint8), np.ones((1, 4, 5))), np.ones((1, 4, 5)))


# -- the refiner ----------------------------------------------------------------------------------
def write_piecewise_voc(root: Path, cam_dir: Path, ids: list[str]) -> dict[str, np.ndarray]:
    """A VOC tree of 16x12 piecewise images (PNG, lossless, under .jpg names as VOC's loader
    accepts any format) with noisy CAMs of classes 2 and 5; returns each image's regions."""
    from tests.conftest import write_voc_tree

    write_voc_tree(root, {"train": ids}, num_classes=6, size=(16, 12))
    regions = {}
    for k, image_id in enumerate(ids):
        image, probs, region = piecewise_case(10 + k)
        Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.jpg", format="PNG")
        # region 0 background, 1 class 2, 2 class 5: CAMs from the two class scores, low (about
        # 0.03, so the background (1 - max)^16 wins) where a class is not favoured
        cams = probs[1:] ** 4 / (probs[1:] ** 4).max(axis=(1, 2), keepdims=True)
        write_cam(cam_dir / f"{image_id}.npz", np.array([2, 5]), cams.astype(np.float32))
        regions[image_id] = region
    return regions


def test_crf_refiner_through_the_host_matches_the_reference(tmp_path: Path) -> None:
    pytest.importorskip("pydensecrf")
    from wsss_bench.data.voc import open_split
    from wsss_bench.engine.dense_crf import dense_crf
    from wsss_bench.evaluation.camfiles import read_cam
    from wsss_bench.refinement import refine_folder

    ids = ["p0", "p1"]
    root, cams = tmp_path / "voc", tmp_path / "cams"
    write_piecewise_voc(root, cams, ids)
    dataset = open_split(root, "train")
    summary = refine_folder("crf", {}, cams, dataset, tmp_path / "masks", show_progress=False)
    assert summary["protocol"]["refiner"] == "crf" and summary["protocol"]["crf"] == "used"
    assert summary["protocol"]["alpha"] == 16.0 and summary["protocol"]["crf_package"].startswith("pydensecrf")
    masks = {}
    for image_id in ids:
        image = np.asarray(dataset.load_image(image_id), np.uint8)
        keys, maps = read_cam(cams / f"{image_id}.npz", dataset.num_classes, image.shape[:2])
        stack = np.concatenate([(1 - maps.max(axis=0, keepdims=True)) ** 16, maps]).astype(np.float32)
        expected = np.array([0, 3, 6], np.uint8)[mean_field_reference(image, stack, **PSA).argmax(0)]
        with Image.open(tmp_path / "masks" / f"{image_id}.png") as png:
            got = np.array(png)
        assert (got == expected).mean() >= 0.99
        assert (got != np.array([0, 3, 6], np.uint8)[stack.argmax(0)]).mean() >= 0.05   # the CRF acted
        assert set(np.unique(got)) == {0, 3, 6}
        masks[image_id] = (got, image, stack)
    # a confidence threshold marks exactly the pixels whose largest marginal is below it unsure
    got, image, stack = masks["p0"]
    best = dense_crf(image, stack).max(axis=0)
    threshold = float(np.quantile(best, 0.25))
    sure = refine_folder("crf", {"confidence": threshold}, cams, dataset, tmp_path / "sure", show_progress=False)
    assert sure["protocol"]["confidence"] == threshold
    with Image.open(tmp_path / "sure" / "p0.png") as png:
        partial = np.array(png)
    assert np.array_equal(partial == 255, best < threshold) and (partial == 255).any()
    assert np.array_equal(partial[best >= threshold], got[best >= threshold])


def test_crf_refiner_conforms() -> None:
    pytest.importorskip("pydensecrf")
    from wsss_bench.testing import cases, check_refiner

    assert [c.name for c in cases("refiner") if c.name == "crf"], "crf has no conformance case"
    check_refiner("crf")
    check_refiner("crf", confidence=0.6)


def test_crf_refiner_options_are_validated(tmp_path: Path) -> None:
    root, cams = tmp_path / "voc", tmp_path / "cams"
    write_piecewise_voc(root, cams, ["q0"])
    result = CliRunner().invoke(cli, ["refine", "--refiner", "crf", "--cams", str(cams), "--data-root", str(root),
                                      "--out", str(tmp_path / "o"), "--set", "refine.options.sigma=3"])
    assert result.exit_code == 2 and "sigma" in result.output and "Traceback" not in result.output


# -- AffinityNet's labels -------------------------------------------------------------------------
def psa_affinity_labels(crf_la: np.ndarray, crf_ha: np.ndarray, keys: np.ndarray, stride: int) -> np.ndarray:
    """PSA's VOC12AffDataset label rule restated on full-size score stacks: block means
    (skimage's block_reduce, zero padding), argmax, la background -> 255, ha background -> 0,
    no score -> 255."""
    def block_mean(stack: np.ndarray) -> np.ndarray:
        k, h, w = stack.shape
        padded = np.zeros((k, -(-h // stride) * stride, -(-w // stride) * stride))
        padded[:, :h, :w] = stack
        return padded.reshape(k, padded.shape[1] // stride, stride, padded.shape[2] // stride, stride).mean((2, 4))

    la, ha = block_mean(crf_la), block_mean(crf_ha)
    lookup = np.concatenate([[0], keys + 1])
    label = lookup[la.argmax(0)]
    label[la.argmax(0) == 0] = 255
    label[ha.argmax(0) == 0] = 0
    label[np.maximum(la.max(0), ha.max(0)) < 1e-5] = 255
    return label.astype(np.uint8)


@pytest.mark.parametrize("seed", [4, 5, 6])
def test_affinity_labels_go_through_the_crf_as_psa(seed: int) -> None:
    pytest.importorskip("pydensecrf")
    from wsss_bench.engine.train_affinity import confident_labels

    image, probs, region = piecewise_case(seed, h=16, w=16)
    cams = probs[1:] ** 4 / (probs[1:] ** 4).max(axis=(1, 2), keepdims=True)   # low off the classes
    keys = np.array([0, 7])

    def stack(alpha: float) -> np.ndarray:
        return np.concatenate([(1 - cams.max(0, keepdims=True)) ** alpha, cams])

    expected = psa_affinity_labels(mean_field_reference(image, stack(4), **PSA),
                                   mean_field_reference(image, stack(32), **PSA), keys, stride=2)
    with_crf = confident_labels(cams, keys, stride=2, image=image)
    assert with_crf.shape == (8, 8) and {0, 1, 255} <= set(np.unique(with_crf).tolist())
    # block means of near-saturated marginals across an edge can tie: 2 of the 64 blocks may
    # differ (measured 0-2 over seeds 4-9)
    assert (with_crf == expected).mean() >= 62 / 64
    without = confident_labels(cams, keys, stride=2)
    assert (without != with_crf).mean() >= 0.1        # the CRF changed the training labels


def test_train_affinity_reports_the_crf(tmp_path: Path) -> None:
    pytest.importorskip("pydensecrf")
    from tests.conftest import write_voc_tree
    from wsss_bench.checkpoints import read_checkpoint
    from wsss_bench.components import create_refiner
    from wsss_bench.data.voc import open_split

    root = write_voc_tree(tmp_path / "voc", {"train": ["a", "b"]}, num_classes=3, size=(24, 24))
    cams = tmp_path / "cams"
    for image_id in ("a", "b"):
        write_cam(cams / f"{image_id}.npz", np.array([1]), np.linspace(0, 1, 24 * 24, dtype=np.float32).reshape(1, 24, 24))
    for setting, said in (("auto", "used"), ("off", "absent")):
        refiner = create_refiner("affinity-rw", backbone="resnet38d", backbone_options={"width": 0.0625},
                                 train={"epochs": 1, "batch_size": 2, "crop_size": 72, "crf": setting})
        out = refiner.fit(open_split(root, "train"), cams, tmp_path / f"aff-{setting}.pth")
        assert refiner.protocol["crf"] == said
        assert read_checkpoint(out)["meta"]["crf"] == said


# -- without the extra ----------------------------------------------------------------------------
@pytest.fixture
def no_pydensecrf(monkeypatch: pytest.MonkeyPatch) -> None:
    """pydensecrf made unimportable (a None entry in sys.modules raises ImportError)."""
    for name in ("pydensecrf", "pydensecrf.densecrf", "pydensecrf.utils", "pydensecrf.eigen"):
        monkeypatch.setitem(sys.modules, name, None)


def test_without_the_extra_the_crf_is_one_line(no_pydensecrf: None, tmp_path: Path) -> None:
    from wsss_bench.components import create_refiner
    from wsss_bench.engine.dense_crf import dense_crf
    from wsss_bench.engine.train_affinity import crf_used

    assert not crf_available()
    assert CRF_EXTRA_MESSAGE == "dense CRF needs the [crf] extra: pip install 'wsss-bench[crf]'"
    with pytest.raises(ConfigError) as made:
        create_refiner("crf")
    assert str(made.value) == CRF_EXTRA_MESSAGE
    with pytest.raises(ConfigError, match=r"\[crf\] extra"):
        dense_crf(np.zeros((2, 2, 3), np.uint8), np.ones((2, 2, 2), np.float32))
    assert crf_used("auto") is False and crf_used("off") is False
    with pytest.raises(ConfigError, match=r"crf=on: dense CRF needs the \[crf\] extra"):
        crf_used("on")
    # the command line: exit 2, the message, no traceback
    root = tmp_path / "voc"
    from tests.conftest import write_voc_tree

    write_voc_tree(root, {"train": ["a"]})
    write_cam(tmp_path / "cams" / "a.npz", np.array([0]), np.ones((1, 32, 40), np.float32))
    result = CliRunner().invoke(cli, ["refine", "--refiner", "crf", "--cams", str(tmp_path / "cams"), "--data-root",
                                      str(root), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert CRF_EXTRA_MESSAGE in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "refine.json").exists()


def test_crf_setting_is_checked() -> None:
    from wsss_bench.engine.train_affinity import crf_used

    with pytest.raises(ConfigError, match="one of auto, on, off"):
        crf_used("yes")
    assert crf_used("auto") is crf_available()


def test_refine_json_states_the_crf(tmp_path: Path) -> None:
    pytest.importorskip("pydensecrf")
    root, cams = tmp_path / "voc", tmp_path / "cams"
    write_piecewise_voc(root, cams, ["q0"])
    result = CliRunner().invoke(cli, ["refine", "--refiner", "crf", "--cams", str(cams), "--data-root", str(root),
                                      "--out", str(tmp_path / "out"), "--set", "refine.options.alpha=4"])
    assert result.exit_code == 0, result.output
    assert "crf: used" in result.output
    summary = json.loads((tmp_path / "out" / "refine.json").read_text())
    assert summary["protocol"]["crf"] == "used" and summary["protocol"]["alpha"] == 4.0
