"""Tests of the Fashion-MNIST scene dataset plugin (``wsss_bench_plugins.dataset_fashion``).

Most tests run on small fake IDX files written here (so they need neither the Debian package
nor much time); the ones marked ``needs_idx`` use the real Fashion-MNIST files of
``apt-get install dataset-fashion-mnist`` and skip without them.  Generation needs
scikit-image's bundled photos (the ``test`` extra) and skips without it.
"""
from __future__ import annotations

import gzip
import importlib
import importlib.util
import json
import struct
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsss_bench.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def _load_plugin():
    """Import the plugin; fall back to its file when the repo is not pip-installed."""
    try:
        return importlib.import_module("wsss_bench_plugins.dataset_fashion")
    except ModuleNotFoundError as exc:
        if exc.name not in ("wsss_bench_plugins", "wsss_bench_plugins.dataset_fashion"):
            raise
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    name = "wsss_bench_plugins.dataset_fashion"
    spec = importlib.util.spec_from_file_location(name, REPO / "plugins" / "dataset_fashion.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # pydantic resolves annotations through sys.modules
    spec.loader.exec_module(module)
    return module


fm = _load_plugin()

REAL_IDX = Path(fm.DEFAULT_IDX_DIR)
HAVE_IDX = all((REAL_IDX / n).is_file() for pair in fm.IDX_FILES.values() for n in pair)
needs_idx = pytest.mark.skipif(
    not HAVE_IDX, reason=f"Fashion-MNIST IDX files absent ({fm.INSTALL_HINT})")
needs_skimage = pytest.mark.skipif(
    importlib.util.find_spec("skimage") is None,
    reason="scikit-image (bundled background photos) not installed: pip install scikit-image")

# ----------------------------------------------------------------------------- fake IDX files


def _idx_bytes(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def _fake_items(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` 28x28 'garments' (ellipses, a handle hole for bags) with cyclic labels 0..9."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28] + 0.5
    images = np.zeros((n, 28, 28), np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    for i in range(n):
        ry, rx = rng.uniform(6, 12), rng.uniform(5, 12)
        cy, cx = 14 + rng.uniform(-1.5, 1.5), 14 + rng.uniform(-1.5, 1.5)
        body = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        img = np.where(body, rng.integers(40, 250, (28, 28)), 0)
        if labels[i] in (5, 8):  # a real opening, like a sandal gap or a bag handle
            img[int(cy) - 2:int(cy) + 2, int(cx) - 2:int(cx) + 2] = 0
        images[i] = img
    return images, labels


def write_fake_idx(folder: Path, n_train: int = 100, n_t10k: int = 60) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for part, n, seed in (("train", n_train, 1), ("t10k", n_t10k, 2)):
        images, labels = _fake_items(n, seed)
        img_name, lab_name = fm.IDX_FILES[part]
        (folder / img_name).write_bytes(gzip.compress(_idx_bytes(images), mtime=0))
        (folder / lab_name).write_bytes(gzip.compress(_idx_bytes(labels), mtime=0))
    return folder


@pytest.fixture(scope="module")
def fake_idx(tmp_path_factory) -> Path:
    return write_fake_idx(tmp_path_factory.mktemp("idx"))


def _spec(idx_dir: Path, **kw) -> "fm.FashionSpec":
    base = dict(idx_dir=str(idx_dir), seed=3, image_size=64, n_train_aug=24, n_train=8,
                n_val=8, n_select=8, min_item_px=28, max_item_px=34)
    base.update(kw)
    return fm.FashionSpec(**base)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _split(root: Path, name: str) -> list[str]:
    return (root / "ImageSets" / "Segmentation" / f"{name}.txt").read_text().split()


def _mask(root: Path, image_id: str) -> np.ndarray:
    return np.asarray(Image.open(root / "SegmentationClassAug" / f"{image_id}.png"))


@pytest.fixture(scope="module")
def small(tmp_path_factory, fake_idx) -> Path:
    if importlib.util.find_spec("skimage") is None:
        pytest.skip("scikit-image not installed")
    return fm.generate(tmp_path_factory.mktemp("fashion") / "data", _spec(fake_idx))


# ----------------------------------------------------------------------------- IDX parsing


def test_read_idx_roundtrip(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(_idx_bytes(array)))
    out = fm.read_idx(path, 3)
    assert out.dtype == np.uint8 and np.array_equal(out, array)


_MALFORMED = [
    ("not gzip", b"\x00\x00\x08\x03" + b"\x00" * 12, "not a readable gzip"),
    ("bad magic", gzip.compress(b"\x01\x00\x08\x03" + struct.pack(">3I", 1, 1, 1) + b"\x00"),
     "magic 01000803"),
    ("int type", gzip.compress(b"\x00\x00\x0c\x03" + struct.pack(">3I", 1, 1, 1) + b"\x00"),
     "magic 00000c03"),
    ("wrong ndim", gzip.compress(b"\x00\x00\x08\x01" + struct.pack(">I", 1) + b"\x00"),
     "3 dimension(s)"),
    ("short data", gzip.compress(b"\x00\x00\x08\x03" + struct.pack(">3I", 2, 2, 2) + b"\x00"),
     "announces shape [2, 2, 2] (8 bytes) but the file holds 1"),
    ("no magic", gzip.compress(b"\x00\x00\x08"), "truncated IDX file"),
    ("short header", gzip.compress(b"\x00\x00\x08\x03" + struct.pack(">2I", 1, 1)),
     "truncated IDX file (12 bytes, header needs 16)"),
    ("cut gzip", gzip.compress(b"\x00\x00\x08\x03" + struct.pack(">3I", 4, 28, 28)
                               + bytes(4 * 784))[:-30], "not a readable gzip"),
]


@pytest.mark.parametrize("payload, needle", [pytest.param(p, n, id=name)
                                             for name, p, n in _MALFORMED])
def test_read_idx_rejects_malformed_files(tmp_path, payload, needle):
    path = tmp_path / "bad.gz"
    path.write_bytes(payload)
    with pytest.raises(fm.DataError) as info:
        fm.read_idx(path, 3)
    message = str(info.value)
    assert needle in message and str(path) in message and "\n" not in message, message


def test_part_checks_shape_and_label_count(tmp_path):
    folder = write_fake_idx(tmp_path / "idx", n_train=20, n_t10k=20)
    img_name, lab_name = fm.IDX_FILES["t10k"]
    (folder / lab_name).write_bytes(gzip.compress(_idx_bytes(np.zeros(19, np.uint8))))
    with pytest.raises(fm.DataError, match="19 labels for 20 images"):
        fm.load_part(folder, "t10k")
    (folder / img_name).write_bytes(gzip.compress(_idx_bytes(np.zeros((19, 20, 20)))))
    with pytest.raises(fm.DataError, match="images are 20x20"):
        fm.load_part(folder, "t10k")


def test_missing_package_is_one_line_naming_apt_get(tmp_path):
    ds = fm.FashionDataset(idx_dir=str(tmp_path / "nope"))
    with pytest.raises(fm.DataError) as info:
        ds.prepare(None, tmp_path / "cache")
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message and "\n" not in message
    assert str(tmp_path / "nope") in message
    assert not (tmp_path / "cache").exists()
    # A folder with one file missing names that file.
    folder = write_fake_idx(tmp_path / "idx", n_train=20, n_t10k=20)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(fm.DataError) as info:
        fm.FashionDataset(idx_dir=str(folder)).prepare(None, tmp_path / "cache")
    assert "t10k-labels-idx1-ubyte.gz" in str(info.value)
    assert "apt-get install dataset-fashion-mnist" in str(info.value)


def _wsss_cli():
    from wsss_bench.cli.main import cli

    return cli


def test_cli_missing_package_exit_2_one_line(tmp_path):
    from click.testing import CliRunner

    result = CliRunner().invoke(_wsss_cli(), ["data", "fashion", "--out", str(tmp_path / "d"),
                                              "--idx-dir", str(tmp_path / "nope")])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "apt-get install dataset-fashion-mnist" in lines[0], lines
    assert not (tmp_path / "d").exists()


def test_cli_run_missing_package_exit_2_one_line(tmp_path):
    """The same one line when a run names the dataset (``--set dataset.name=fashion``)."""
    from click.testing import CliRunner

    result = CliRunner().invoke(_wsss_cli(), [
        "run", "--preset", "smoke", "--device", "cpu", "--quiet", "--out", str(tmp_path / "run"),
        "--set", "dataset.name=fashion",
        "--set", f"dataset.options.idx_dir={tmp_path / 'nope'}"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "apt-get install dataset-fashion-mnist" in lines[0], lines


# ----------------------------------------------------------------------------- mask rule


def test_upscale_is_torch_bilinear():
    import torch
    import torch.nn.functional as F

    item = np.random.default_rng(0).integers(0, 256, (28, 28)).astype(np.uint8)
    for size in (28, 29, 33, 40, 56):
        ref = F.interpolate(torch.from_numpy(item.astype(np.float64))[None, None],
                            size=(size, size), mode="bilinear", align_corners=False)[0, 0]
        assert np.abs(fm.upscale(item, size) - ref.numpy()).max() <= 5e-5, size
    assert np.array_equal(fm.upscale(item, 28), item.astype(np.float64))  # identity at 28 px


def _artificial_item() -> np.ndarray:
    """A 28x28 'garment' with hand-countable parts (values of the stored negative)."""
    a = np.zeros((28, 28), np.uint8)
    a[4:24, 6:22] = 200   # body: 20 rows x 16 columns = 320 px
    a[10:16, 10:16] = 0   # a real hole: 6 x 6 = 36 px
    a[19, 17] = 0         # a 1-px pinhole
    a[1, 26] = 60         # a faint 1-px speck
    a[25:27, 1:3] = 255   # a 2x2 blob, apart from the body
    return a


def test_mask_rule_on_artificial_item_at_source_size():
    # At 28 px up-scaling is the identity, so the counts are read off the drawing: the body
    # (320) minus the hole (36); the pinhole (1 px < 3) is filled, the speck (1 px) and the 2x2
    # blob (4 px < 10) are dropped.
    up = fm.upscale(_artificial_item(), 28)
    mask = fm.item_mask(up, threshold=16, min_speck_px=10, min_hole_px=3)
    assert mask.sum() == 320 - 36 == 284
    assert not mask[10:16, 10:16].any() and mask[19, 17]
    assert not mask[1, 26] and not mask[25:27, 1:3].any()
    assert mask[4:24, 6:22].sum() == 284
    # With the rule's sizes at zero, nothing is dropped or filled: 320 - 36 - 1 + 1 + 4.
    assert fm.item_mask(up, 16, 0, 0).sum() == 288


def test_mask_rule_on_artificial_item_at_double_size():
    # At 56 px, output pixel i samples source position i/2 - 1/4, so along an axis a 0->1 step
    # at source pixel j gives weights 1/4, 3/4 at outputs 2j-1, 2j, and a single source pixel j
    # gives 1/4, 3/4, 3/4, 1/4 at outputs 2j-1 .. 2j+2.
    mask = fm.item_mask(fm.upscale(_artificial_item(), 56), 16, 10, 3)
    # Body: rows 7..48 (42) x cols 11..44 (34); its 4 corners are 200/16 = 12.5 < 16: 1424 px.
    assert not mask[7, 11] and mask[7, 12] and mask[8, 11]
    # Hole: v = 200 (1 - h_r h_c) < 16 only where both hole weights are 1: 10 x 10 = 100 px,
    # kept (>= 3).  The ring around it is >= 200 (1 - 3/4) = 50 and stays foreground.
    assert not mask[21:31, 21:31].any() and mask[20, 20] and mask[19:33, 19:33].sum() == 96
    # Pinhole: min 200 (1 - 9/16) = 87.5 >= 16, so it vanishes in the interpolation itself.
    assert mask[37:41, 33:37].all()
    # Speck (60): 60 * 9/16 and 60 * 3/16 = 11.25 -> only its 2x2 centre (33.75) >= 16: 4 px,
    # dropped.  Blob (255): 6x6 outputs minus 4 corners (255/16 = 15.9 < 16) = 32 px, kept.
    assert not mask[0:6, 50:56].any()
    assert mask[49:55, 1:7].sum() == 32 and not mask[49, 1]
    assert mask.sum() == 1424 - 100 + 32 == 1356


def _independent_mask(item: np.ndarray, size: int, threshold: float = 16.0,
                      min_speck: int = 10, min_hole: int = 3) -> tuple[np.ndarray, list[int]]:
    """The mask rule rebuilt from other parts: torch's bilinear, scipy's binary_fill_holes."""
    import torch
    import torch.nn.functional as F
    from scipy import ndimage

    up = F.interpolate(torch.from_numpy(item.astype(np.float64))[None, None],
                       size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()
    assert np.abs(up - threshold).min() > 1e-3  # no value is borderline for the comparison
    fg = up >= threshold
    comps, n = ndimage.label(fg, structure=np.ones((3, 3)))
    for k in range(1, n + 1):
        if (comps == k).sum() < min_speck:
            fg[comps == k] = False
    holes, n_holes = ndimage.label(ndimage.binary_fill_holes(fg) & ~fg)  # 4-connected
    kept = []
    for k in range(1, n_holes + 1):
        area = int((holes == k).sum())
        if area < min_hole:
            fg[holes == k] = True
        else:
            kept.append(area)
    return fg, sorted(kept)


def _holes(mask: np.ndarray) -> list[int]:
    from scipy import ndimage

    holes, n = ndimage.label(ndimage.binary_fill_holes(mask) & ~mask)
    return sorted(int((holes == k).sum()) for k in range(1, n + 1))


# (t10k index, fine class, side, mask pixels, kept holes): counted by the independent rebuild
# above and checked against ASCII prints of the masks (the sandal's two strap gaps, the bag's
# handle opening and a small gap beside the body; the T-shirt is solid).
REAL_ITEMS = [
    (11, "sandal", 40, 494, [9, 18]),
    (30, "bag", 40, 1048, [12, 69]),
    (19, "T-shirt/top", 40, 960, []),
]


@needs_idx
@pytest.mark.parametrize("index, fine, side, pixels, holes", REAL_ITEMS)
def test_mask_rule_on_real_items(index, fine, side, pixels, holes):
    part = fm.load_part(REAL_IDX, "t10k")
    assert fm.FINE_NAMES[int(part.labels[index])] == fine
    item = part.images[index]
    mask = fm.item_mask(fm.upscale(item, side), 16, 10, 3)
    assert int(mask.sum()) == pixels
    assert _holes(mask) == holes
    ref, ref_holes = _independent_mask(item, side)
    assert np.array_equal(mask, ref) and ref_holes == holes


def test_alpha_paints_exactly_the_mask():
    up = fm.upscale(_artificial_item(), 56)
    mask = fm.item_mask(up, 16, 10, 3)
    alpha = fm.item_alpha(up, mask, 16)
    assert (alpha[mask] == 1).all() and (alpha[~mask] < 1).all()
    # Outside the mask only a 1-px fringe below the threshold is blended, never the dropped
    # speck (whose pixels are >= 16).
    assert (alpha[0:6, 50:56] == 0).all()
    assert ((alpha > 0) & ~mask).sum() > 0


# ----------------------------------------------------------------------------- determinism


@needs_skimage
def test_same_options_give_byte_identical_files(small, tmp_path, fake_idx):
    again = fm.generate(tmp_path / "again", _spec(fake_idx))
    assert _files(again) == _files(small)


@needs_skimage
def test_different_seed_gives_different_images(small, tmp_path, fake_idx):
    other = fm.generate(tmp_path / "other", _spec(fake_idx, seed=4))
    a, b = _files(small), _files(other)
    jpgs = [k for k in a if k.startswith("JPEGImages/")]
    assert sum(a[k] != b[k] for k in jpgs) == len(jpgs)
    assert (json.loads(a["fashion.json"])["spec_fingerprint"]
            != json.loads(b["fashion.json"])["spec_fingerprint"])


@needs_skimage
def test_split_sizes_do_not_change_other_images(small, tmp_path, fake_idx):
    other = fm.generate(tmp_path / "other", _spec(fake_idx, n_train_aug=10, n_train=2, n_val=3,
                                                  n_select=0))
    a, b = _files(small), _files(other)
    for image_id in _split(other, "train_aug") + _split(other, "val"):
        for rel in (f"JPEGImages/{image_id}.jpg", f"SegmentationClassAug/{image_id}.png"):
            assert a[rel] == b[rel], rel
    assert _split(other, "select") == []


# ----------------------------------------------------------------------------- layout, splits


@needs_skimage
def test_layout_and_splits(small, fake_idx):
    spec = _spec(fake_idx)
    for rel in ("class_names.txt", "cls_labels.json", "subtype_labels.json", "items.json",
                "fashion.json"):
        assert (small / rel).is_file(), rel
    train_aug, train, val, select = (_split(small, s)
                                     for s in ("train_aug", "train", "val", "select"))
    assert (len(train_aug), len(val), len(select)) == (24, 8, 8)
    assert train == train_aug[:8]
    assert not (set(train_aug) & set(val)) and not (set(train_aug) & set(select))
    assert not set(val) & set(select)
    assert train_aug[0] == "fmn_000000" and val[0] == "fmn_800000" and select[0] == "fmn_900000"
    assert (small / "class_names.txt").read_text().splitlines() == ["top", "footwear", "long",
                                                                    "bag"]
    for image_id in train_aug + val + select:
        with Image.open(small / "JPEGImages" / f"{image_id}.jpg") as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (64, 64)
        with Image.open(small / "SegmentationClassAug" / f"{image_id}.png") as m:
            assert m.format == "PNG" and m.mode == "L" and m.size == (64, 64)
    meta = json.loads((small / "fashion.json").read_text())
    assert meta["spec"] == spec.model_dump()
    assert meta["spec_fingerprint"] == spec.fingerprint(fm.source_digests(fake_idx))
    assert meta["splits"] == {"train_aug": 24, "train": 8, "val": 8, "select": 8}
    assert meta["source_ranges"] == {"train_aug": {"part": "train", "first": 0, "end": 100},
                                     "val": {"part": "t10k", "first": 0, "end": 30},
                                     "select": {"part": "t10k", "first": 30, "end": 60}}
    leftovers = [p.name for p in small.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert leftovers == []


@needs_skimage
def test_training_and_evaluation_items_are_disjoint(small):
    items = json.loads((small / "items.json").read_text())
    sources = {split: {(it["source"], it["index"]) for i in _split(small, split)
                       for it in items[i]["items"]}
               for split in ("train_aug", "val", "select")}
    assert {s for s, _ in sources["train_aug"]} == {"train"}
    assert {s for s, _ in sources["val"]} == {"t10k"} == {s for s, _ in sources["select"]}
    assert all(0 <= i < 30 for _, i in sources["val"])
    assert all(30 <= i < 60 for _, i in sources["select"])
    assert not sources["val"] & sources["select"]


@needs_skimage
def test_masks_labels_and_items_agree(small, fake_idx):
    spec = _spec(fake_idx)
    labels = json.loads((small / "cls_labels.json").read_text())
    items = json.loads((small / "items.json").read_text())
    parts = {p: fm.load_part(fake_idx, p) for p in ("train", "t10k")}
    ids = _split(small, "train_aug") + _split(small, "val") + _split(small, "select")
    assert set(labels) == set(ids) == set(items)
    n_multi = 0
    for image_id in ids:
        mask = _mask(small, image_id)
        present = sorted(int(v) - 1 for v in np.unique(mask) if v > 0)
        assert labels[image_id] == present and present, image_id
        assert set(np.unique(mask).tolist()) <= set(range(len(fm.CLASS_NAMES) + 1))
        # Recompose the mask from the recorded items with the mask rule: it must be the PNG.
        ids_map = np.zeros_like(mask, dtype=np.int16)
        placed = items[image_id]["items"]
        for k, it in enumerate(placed, start=1):
            src = parts[it["source"]]
            assert int(src.labels[it["index"]]) == it["fine"]
            assert fm.SUBTYPES[it["class"]][it["subtype"]] == it["fine"]
            pixels = src.images[it["index"]]
            own = fm.item_mask(fm.upscale(pixels[:, ::-1] if it["flip"] else pixels, it["size"]),
                               spec.threshold, spec.min_speck_px, spec.min_hole_px)
            assert int(own.sum()) == it["area"] and spec.min_item_px <= it["size"] <= 34
            y, x, s = it["y"], it["x"], it["size"]
            ids_map[y:y + s, x:x + s][own] = k
        lut = np.array([0] + [it["class"] + 1 for it in placed], np.uint8)
        assert np.array_equal(lut[ids_map], mask), image_id
        for k, it in enumerate(placed, start=1):
            assert int((ids_map == k).sum()) == it["visible"]
            assert it["visible"] >= spec.min_visible * it["area"]  # occlusion limit
        n_multi += len(present) >= 2
    assert n_multi >= 3


@needs_skimage
def test_images_are_colour_photographs(small):
    image_id = _split(small, "train_aug")[0]
    img = np.asarray(Image.open(small / "JPEGImages" / f"{image_id}.jpg"), np.int16)
    items = json.loads((small / "items.json").read_text())[image_id]
    assert items["background"]["photo"] in fm.BACKGROUNDS
    assert np.abs(img[..., 0] - img[..., 1]).mean() > 2  # tinted, not gray


# ----------------------------------------------------------------------------- sub-type truth


@needs_skimage
def test_subtype_labels_file(small):
    doc = json.loads((small / "subtype_labels.json").read_text())
    assert list(doc) == ["format", "num_subtypes", "subtype_names", "labels"]
    assert doc["format"] == "wsss_bench.subtypes/1"
    assert doc["num_subtypes"] == [4, 3, 2, 1]
    assert doc["subtype_names"] == [["T-shirt/top", "pullover", "coat", "shirt"],
                                    ["sandal", "sneaker", "ankle boot"],
                                    ["trouser", "dress"], ["bag"]]
    items = json.loads((small / "items.json").read_text())
    labels = json.loads((small / "cls_labels.json").read_text())
    assert set(doc["labels"]) == set(labels)
    for image_id, subs in doc["labels"].items():
        assert len(subs) == 4
        for c, s in enumerate(subs):
            assert (s == -1) == (c not in labels[image_id])
            if s == -1:
                continue
            assert 0 <= s < doc["num_subtypes"][c]
            of_c = [it for it in items[image_id]["items"] if it["class"] == c]
            largest = max(it["visible"] for it in of_c)
            first = next(it for it in of_c if it["visible"] == largest)
            assert s == first["subtype"]
            assert doc["subtype_names"][c][s] == first["fine_name"]


@needs_skimage
def test_subtype_file_reads_with_the_host_reader(small):
    subtypes = pytest.importorskip("wsss_bench.data.subtypes")
    truth = subtypes.read_subtype_truth(small, len(fm.CLASS_NAMES))
    assert truth is not None and truth.num_subtypes == [4, 3, 2, 1]
    ids = _split(small, "select")
    doc = json.loads((small / "subtype_labels.json").read_text())
    assert truth.matrix(ids).tolist() == [doc["labels"][i] for i in ids]


def test_largest_visible_item_wins_and_ties_go_to_the_earliest():
    def it(cls, sub, visible):
        return {"class": cls, "subtype": sub, "visible": visible}

    assert fm.largest_visible_subtypes([it(0, 1, 50), it(0, 3, 80), it(1, 2, 10)]) == [3, 2, -1,
                                                                                        -1]
    assert fm.largest_visible_subtypes([it(0, 1, 80), it(0, 3, 80)]) == [1, -1, -1, -1]
    assert fm.largest_visible_subtypes([it(3, 0, 0)]) == [-1, -1, -1, -1]  # nothing visible


# ----------------------------------------------------------------------------- wsss_bench reads it


@needs_skimage
def test_wsss_bench_opens_the_tree(small):
    from wsss_bench.data.voc import open_split

    labels = json.loads((small / "cls_labels.json").read_text())
    for split in ("train_aug", "train", "val", "select"):
        ds = open_split(small, split, class_names=list(fm.CLASS_NAMES))
        assert ds.num_classes == 4 and ds.ids == _split(small, split)
        for image_id in ds.ids[:4]:
            image = ds.load_image(image_id)
            mask = ds.load_mask(image_id, image.size)
            assert mask.shape == (64, 64)
            assert np.flatnonzero(ds.label(image_id)).tolist() == labels[image_id]
    # Without being told the class names, the reader takes them from class_names.txt.
    assert open_split(small, "val").class_names == list(fm.CLASS_NAMES)


@needs_skimage
def test_registered_dataset_prepares_a_cached_tree(tmp_path, monkeypatch, fake_idx):
    import wsss_bench
    from wsss_bench.orchestration.runner import resolve_data_root

    assert "fashion" in wsss_bench.list_datasets()
    opts = dict(idx_dir=str(fake_idx), n_train_aug=6, n_train=2, n_val=2, n_select=2,
                image_size=48)
    ds = wsss_bench.create_dataset("fashion", **opts)
    assert ds.class_names == list(fm.CLASS_NAMES)
    root = ds.prepare(None, tmp_path)
    assert root == tmp_path / f"fashion-{ds.fingerprint}"
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert wsss_bench.create_dataset("fashion", **opts).prepare(None, tmp_path) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == stamps  # reused, not rewritten
    other = wsss_bench.create_dataset("fashion", **dict(opts, seed=5)).prepare(None, tmp_path)
    assert other != root and other.parent == tmp_path
    # The run machinery resolves it like the synthetic set.
    config = wsss_bench.load_config("smoke", sets=["dataset.name=fashion",
                                                   f"dataset.options={json.dumps(opts)}"])
    monkeypatch.setenv("WSSS_BENCH_CACHE", str(tmp_path))
    assert resolve_data_root(config) == (root, list(fm.CLASS_NAMES))


# ----------------------------------------------------------------------------- caching, atomicity


@needs_skimage
def test_fingerprint_follows_sources_not_their_folder(tmp_path, fake_idx):
    import shutil

    spec = _spec(fake_idx)
    fp = spec.fingerprint(fm.source_digests(fake_idx))
    copy = tmp_path / "copy"
    shutil.copytree(fake_idx, copy)
    assert spec.fingerprint(fm.source_digests(copy)) == fp  # idx_dir is not in it
    images, labels = _fake_items(60, 99)
    (copy / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(images), mtime=0))
    assert spec.fingerprint(fm.source_digests(copy)) != fp
    for name, value in [("seed", 9), ("threshold", 20.0), ("min_speck_px", 5)]:
        assert spec.model_copy(update={name: value}).fingerprint(fm.source_digests(fake_idx)) != fp


@needs_skimage
def test_failed_generation_leaves_nothing(tmp_path, monkeypatch, fake_idx):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(fm, "_encode_png", boom)
    with pytest.raises(RuntimeError):
        fm.generate(tmp_path / "data", _spec(fake_idx, n_train_aug=3, n_train=1, n_val=1,
                                             n_select=1))
    assert list(tmp_path.iterdir()) == []


@needs_skimage
def test_incomplete_or_foreign_trees(tmp_path, fake_idx):
    spec = _spec(fake_idx, n_train_aug=3, n_train=1, n_val=1, n_select=1)
    out = fm.generate(tmp_path / "data", spec)
    (out / "JPEGImages" / "fmn_000001.jpg").unlink()
    assert not fm.is_complete(out, spec)
    fm.generate(out, spec)
    assert (out / "JPEGImages" / "fmn_000001.jpg").is_file() and fm.is_complete(out, spec)
    (out / "fashion.json").unlink()  # a tree without its marker is never taken as complete
    assert not fm.is_complete(out, spec)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserError):
        fm.generate(foreign, spec)
    assert (foreign / "notes.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------- options, hooks, CLI


@pytest.mark.parametrize("bad", [
    {"image_size": 16}, {"n_train": 500}, {"max_item_px": 27}, {"min_item_px": 40,
                                                                "max_item_px": 30},
    {"max_item_px": 100, "image_size": 96}, {"threshold": 0}, {"colour": "red"},
])
def test_options_are_validated(bad):
    with pytest.raises(Exception) as info:
        fm.FashionOptions(**bad)
    assert type(info.value).__name__ == "ValidationError"
    with pytest.raises(fm.ConfigError):
        fm.FashionDataset(**bad)


def test_register_hooks():
    calls = []
    fm.register_datasets(register=lambda *a, **k: calls.append((a, k)))
    (args, kwargs), = calls
    assert args == ("fashion", fm.FashionDataset)
    assert kwargs["options"] is fm.FashionOptions and kwargs["help"]
    assert "fashion" in _wsss_cli().commands["data"].commands
    assert "synth" in _wsss_cli().commands["data"].commands  # the sibling still there


@needs_skimage
@pytest.mark.parametrize("core_defines_data", [True, False])
def test_cli_data_fashion(tmp_path, fake_idx, core_defines_data):
    import click
    from click.testing import CliRunner

    @click.group()
    def cli() -> None:
        """wsss"""

    if core_defines_data:
        @cli.group("data")
        def data() -> None:
            """Dataset utilities."""

    fm.register_commands(cli=cli)
    assert "fashion" in cli.commands["data"].commands
    out = tmp_path / "d"
    args = ["data", "fashion", "--out", str(out), "--idx-dir", str(fake_idx), "--seed", "2",
            "--n-train-aug", "4", "--n-train", "2", "--n-val", "1", "--n-select", "1",
            "--image-size", "48", "--preview", str(tmp_path / "p.png")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == str(out) and "generated" in lines[1] and "1 select" in lines[1]
    assert (tmp_path / "p.png").is_file()
    assert json.loads((out / "fashion.json").read_text())["spec"]["seed"] == 2
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0 and "reused" in again.output
    bad = CliRunner().invoke(cli, ["data", "fashion", "--out", str(out), "--image-size", "8"])
    assert bad.exit_code != 0 and isinstance(bad.exception, UserError)


# ----------------------------------------------------------------------------- the real thing


@needs_idx
@needs_skimage
def test_default_dataset_from_the_real_files(tmp_path):
    """The default options on the real Fashion-MNIST: fast, balanced, no garment reused."""
    start = time.perf_counter()
    root = fm.FashionDataset().prepare(None, tmp_path)
    elapsed = time.perf_counter() - start
    assert elapsed < 30, f"generation took {elapsed:.1f} s"
    sizes = {s: len(_split(root, s)) for s in ("train_aug", "train", "val", "select")}
    assert sizes == {"train_aug": 400, "train": 100, "val": 100, "select": 100}
    items = json.loads((root / "items.json").read_text())
    labels = json.loads((root / "cls_labels.json").read_text())
    subs = json.loads((root / "subtype_labels.json").read_text())["labels"]
    used = {}
    for split in ("train_aug", "val", "select"):
        keys = [(it["source"], it["index"]) for i in _split(root, split)
                for it in items[i]["items"]]
        assert len(keys) == len(set(keys)), split  # no garment twice within a split
        used[split] = set(keys)
    assert not used["val"] & used["select"]
    assert {s for s, _ in used["train_aug"]} == {"train"}
    assert all(i < 5000 for _, i in used["val"]) and all(i >= 5000 for _, i in used["select"])
    train_aug = _split(root, "train_aug")
    per_class = [sum(c in labels[i] for i in train_aug) for c in range(4)]
    assert min(per_class) >= 100, per_class  # parents are drawn uniformly
    seen = {(c, s) for i in train_aug for c, s in enumerate(subs[i]) if s >= 0}
    assert seen == {(c, s) for c, fines in enumerate(fm.SUBTYPES) for s in range(len(fines))}
    assert sum(len(labels[i]) >= 2 for i in train_aug) >= 100
