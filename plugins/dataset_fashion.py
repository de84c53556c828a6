"""Fashion-MNIST scenes: real product photographs pasted on real texture photographs, VOC layout.

The ``synthetic`` dataset draws its objects; this one takes them from Fashion-MNIST (Xiao et al.,
2017: 70 000 Zalando product photos, 28x28 grayscale, ten fine classes), read from the IDX files
of the Debian package ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``;
``/usr/share/datasets/fashion-mnist`` by default, option ``idx_dir``).  The IDX format is parsed
here with numpy (gzip, header check), so nothing is downloaded.

Design
------

* **Parent classes with known sub-categories.**  The C = 4 foreground classes are super-classes
  whose members are Fashion-MNIST's fine classes, so the sub-category structure SC-CAM looks for
  is known exactly::

      1 top       T-shirt/top, pullover, coat, shirt       (sub-types 0..3)
      2 footwear  sandal, sneaker, ankle boot              (sub-types 0..2)
      3 long      trouser, dress                           (sub-types 0..1)
      4 bag       bag                                      (sub-type 0)

  Parent classes are drawn uniformly (each image's first item cycles through a fresh
  permutation of the classes every C images, so every class appears); the fine class follows
  from a uniform pick in the parent's pool, and Fashion-MNIST is balanced per fine class, so
  sub-types are uniform within a parent.
* **Scenes.**  Each image (``image_size``, default 96 px) holds 1..``max_items`` (3) items,
  geometric-ish counts (weights 1, 0.6, 0.36) as in the synthetic set.  Items are flipped
  horizontally with probability 1/2 and up-scaled from 28 px to a side drawn uniformly from
  ``min_item_px``..``max_item_px`` (28..40) with **bilinear interpolation, half-pixel centres,
  edge-clamped** (``align_corners=False``; the same as ``torch.nn.functional.interpolate(...,
  mode="bilinear")`` and PIL's BILINEAR when enlarging), computed in float64 and rounded to
  1e-4 so the threshold below does not depend on summation order.  The item square lies wholly
  inside the image.
* **Backgrounds** are random square crops (25-75 % of the photo's shorter side, random
  rotation by a multiple of 90 degrees and mirror) of scikit-image's bundled photographs --
  ``brick``, ``grass``, ``gravel``, ``moon`` (grayscale textures, given a random low-saturation
  tint and brightness), ``immunohistochemistry``, ``coffee`` and ``chelsea`` (colour photos
  with real clutter: a cup, a cat's fur) -- resized to the image size with PIL's BILINEAR filter.
* **Colour.**  Fashion-MNIST stores the *negative* of each product photo (background 0), so an
  item is painted with brightness ``(255 - v) / 255`` times a random tint (uniform hue,
  saturation 0.15-0.75, gain 0.8-1.0): a black boot stays dark, a white shirt takes the tint.
  Tints are independent of the class, so colour carries no label.
* **Mask rule** (per item, on its own up-scaled intensity ``v`` in 0..255, never on the
  composite):

  1. foreground = ``v >= threshold`` (16);
  2. 8-connected foreground components of fewer than ``min_speck_px`` (10) up-scaled pixels
     are dropped (dust, stray bits of sharpening halo);
  3. 4-connected background regions enclosed by the item and of fewer than ``min_hole_px``
     (3) up-scaled pixels are filled: such 1-2 px pinholes are intensity dips of light
     garments, not openings.  Every larger hole is **kept** (gaps between sandal straps, bag
     handles), so the background really shows through it.  Both sizes are counted on the
     up-scaled item, i.e. on the mask as written.

  The item is painted opaque exactly on its mask; a 1-pixel fringe around it (pixels outside
  the mask, 8-adjacent to it, ``v < threshold``) is blended with opacity ``v / threshold`` to
  anti-alias the edge, and nothing else is painted, so every opaque item pixel is labelled and
  every labelled pixel is item.  Masks hold 0 (background) and 1..C; no 255 ignore band.
* **Occlusion.**  Later items occlude earlier ones.  A new item is placed at one of up to 30
  random positions such that every earlier item keeps at least ``min_visible`` (50 %) of its
  mask visible, and dropped if none works (the first item always fits).  Image-level labels
  are read back from the composed mask.
* **Splits.**  ``train_aug`` (``n_train_aug`` 400) takes its items from ``train-images``;
  ``train`` is its first ``n_train`` (100) ids; ``val`` (``n_val`` 100) takes items from the
  first half of ``t10k-images`` (indices 0..4999) and ``select`` (``n_select`` 100, a labelled
  split meant only for choosing recipes and thresholds) from the second half (5000..9999).  So
  no garment is in both training and evaluation data, and val and select share none either.
  Within a split each parent class's pool is walked through a seeded permutation, slot
  ``index * max_items + j`` for item ``j`` of image ``index``, so no garment repeats within a
  split until the pool is exhausted.  Source items with fewer than 40 pixels at or above the
  threshold (nearly blank scans) are left out of the pools.
* **Determinism.**  Every image is drawn from its own generator seeded with
  (seed, split, index); pool permutations depend on (seed, split, class) only.  Changing a
  split's size never changes other images.  Same options and same source files give
  byte-identical trees.

Output layout (under ``out``)::

    JPEGImages/<id>.jpg                     RGB, JPEG quality ``jpeg_quality``, 4:4:4 chroma
    SegmentationClassAug/<id>.png           'L' index PNG: 0..C
    ImageSets/Segmentation/{train_aug,train,val,select}.txt
    class_names.txt                         top, footwear, long, bag
    cls_labels.json                         {id: [0-based classes present]}
    subtype_labels.json                     sub-type truth (format "wsss_bench.subtypes/1", below)
    items.json                              {id: {"background": {...}, "items": [...]}}: source
                                            file and index, fine class, pose, area, visible px
    fashion.json                            spec, fingerprint, source digests; written last
                                            (its presence marks the tree complete)

``subtype_labels.json`` is ``{"format": "wsss_bench.subtypes/1", "num_subtypes": [4, 3, 2, 1],
"subtype_names": [[fine names] per class], "labels": {id: [s_0, ..., s_{C-1}]}}`` where ``s_c``
is the sub-type of the largest visible item of class ``c`` in the image (ties: the earliest
pasted item) and -1 when ``c`` is absent.

Ids: ``fmn_000000..`` (train_aug), ``fmn_800000..`` (val), ``fmn_900000..`` (select).
Generated trees are cached under ``<cache>/fashion-<fingerprint>``; the fingerprint covers the
format version, every option except ``idx_dir`` and the SHA-256 of the IDX files and of the
background photos, so a changed source never passes for a cached tree.
"""
from __future__ import annotations

import colorsys
import functools
import gzip
import hashlib
import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import click
import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from scipy import ndimage

from wsss_bench.data.generated import (add_data_command, generator_command, install_tree,
                                       options_error, read_marker, replaceable)
# Module-level names (patched by the tests' fault injection).
from wsss_bench.data.generated import dump_json as _dump_json
from wsss_bench.data.generated import encode_jpeg as _encode_jpeg
from wsss_bench.data.generated import encode_png as _encode_png
from wsss_bench.errors import ConfigError, DataError
from wsss_bench.io import file_sha256
from wsss_bench.hookspecs import hookimpl

#: Bump whenever the generator changes the bytes written for given options and sources.
FORMAT_VERSION = 1
GENERATOR = "wsss_bench_plugins.dataset_fashion"
SUBTYPES_FORMAT = "wsss_bench.subtypes/1"

DEFAULT_IDX_DIR = "/usr/share/datasets/fashion-mnist"
APT_PACKAGE = "dataset-fashion-mnist"
INSTALL_HINT = f"apt-get install {APT_PACKAGE}"
#: (images, labels) file names of the two Fashion-MNIST parts.
IDX_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "t10k": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
SOURCE_SIDE = 28  # Fashion-MNIST images are 28x28

FINE_NAMES: tuple[str, ...] = ("T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal",
                               "shirt", "sneaker", "bag", "ankle boot")
CLASS_NAMES: tuple[str, ...] = ("top", "footwear", "long", "bag")
#: Fine Fashion-MNIST classes of each parent class; the position is the sub-type index.
SUBTYPES: tuple[tuple[int, ...], ...] = ((0, 2, 4, 6), (5, 7, 9), (1, 3), (8,))
FINE_TO_CLASS: dict[int, int] = {f: c for c, fines in enumerate(SUBTYPES) for f in fines}
FINE_TO_SUBTYPE: dict[int, int] = {f: s for fines in SUBTYPES for s, f in enumerate(fines)}

#: scikit-image's bundled photographs used as backgrounds (``skimage.data.<name>()``).
BACKGROUNDS: tuple[str, ...] = ("brick", "grass", "gravel", "moon", "immunohistochemistry",
                                "coffee", "chelsea")

#: Split -> (IDX part, first index, end index as a fraction of that part's length).
SPLIT_SOURCES: dict[str, tuple[str, float, float]] = {
    "train_aug": ("train", 0.0, 1.0),
    "val": ("t10k", 0.0, 0.5),
    "select": ("t10k", 0.5, 1.0),
}
ID_OFFSETS: dict[str, int] = {"train_aug": 0, "val": 800_000, "select": 900_000}
_SPLIT_CODES: dict[str, int] = {"train_aug": 0, "val": 1, "select": 2}
ID_PREFIX = "fmn_"

#: Source items with fewer pixels >= threshold are nearly blank scans and never used.
MIN_SOURCE_INK = 40
#: Random positions tried for an item before it is dropped.
PLACEMENT_TRIES = 30

Array = np.ndarray

# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------


class FashionSpec(BaseModel):
    """Every option of the dataset; all but ``idx_dir`` determine the generated bytes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    idx_dir: str = Field(DEFAULT_IDX_DIR, description="Folder with the Fashion-MNIST IDX .gz "
                         f"files ({INSTALL_HINT}).")
    seed: int = Field(0, ge=0, description="Random seed; same options give byte-identical files.")
    image_size: int = Field(96, ge=48, le=1024, description="Square image side in pixels.")
    n_train_aug: int = Field(400, ge=1, lt=ID_OFFSETS["val"], description="train_aug images.")
    n_train: int = Field(100, ge=0, description="train = first N ids of train_aug.")
    n_val: int = Field(100, ge=0, lt=ID_OFFSETS["select"] - ID_OFFSETS["val"],
                       description="val images (items from t10k 0..4999).")
    n_select: int = Field(100, ge=0, lt=100_000,
                          description="select images (items from t10k 5000..9999).")
    max_items: int = Field(3, ge=1, le=4, description="Most items per image.")
    min_item_px: int = Field(28, ge=SOURCE_SIDE, description="Smallest up-scaled item side.")
    max_item_px: int = Field(40, ge=SOURCE_SIDE, description="Largest up-scaled item side.")
    threshold: float = Field(16.0, gt=0.0, lt=255.0,
                             description="Mask: up-scaled intensity >= this (0..255).")
    min_speck_px: int = Field(10, ge=0, description="Mask: drop 8-connected components of fewer "
                              "up-scaled pixels.")
    min_hole_px: int = Field(3, ge=0, description="Mask: fill enclosed 4-connected holes of "
                             "fewer up-scaled pixels.")
    min_visible: float = Field(0.5, gt=0.0, le=1.0,
                               description="Least visible fraction of an occluded item.")
    jpeg_quality: int = Field(95, ge=50, le=100, description="JPEG quality of the images.")

    @model_validator(mode="after")
    def _check_relations(self) -> "FashionSpec":
        if self.n_train > self.n_train_aug:
            raise ValueError(f"n_train ({self.n_train}) must not exceed n_train_aug "
                             f"({self.n_train_aug}): train is a subset of train_aug")
        if self.min_item_px > self.max_item_px:
            raise ValueError("min_item_px must not exceed max_item_px")
        if self.max_item_px > self.image_size:
            raise ValueError(f"max_item_px ({self.max_item_px}) must not exceed image_size "
                             f"({self.image_size})")
        return self

    def fingerprint(self, sources: dict[str, str]) -> str:
        """Short hash of the format version, the options (bar ``idx_dir``) and source digests."""
        spec = self.model_dump(exclude={"idx_dir"})
        blob = json.dumps({"format_version": FORMAT_VERSION, "spec": spec, "sources": sources},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


#: The options model registered with the host.
FashionOptions = FashionSpec


# --------------------------------------------------------------------------------------------
# IDX files
# --------------------------------------------------------------------------------------------


def _missing(path: Path, what: str) -> DataError:
    return DataError(f"{path}: Fashion-MNIST {what} not found; install the Debian package "
                     f"({INSTALL_HINT}) or point the idx_dir option at a copy")


def idx_paths(idx_dir: str | Path) -> dict[str, Path]:
    """The four IDX files of ``idx_dir`` by role (``train-images`` ...), checked to exist."""
    folder = Path(idx_dir)
    if not folder.is_dir():
        raise _missing(folder, "folder")
    out: dict[str, Path] = {}
    for part, (images, labels) in IDX_FILES.items():
        for role, name in (("images", images), ("labels", labels)):
            path = folder / name
            if not path.is_file():
                raise _missing(path, "file")
            out[f"{part}-{role}"] = path
    return out


def read_idx(path: str | Path, ndim: int) -> Array:
    """A gzip-compressed IDX file of unsigned bytes with ``ndim`` dimensions, as uint8 array.

    IDX: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions, then
    that many big-endian uint32 sizes, then the data in C order.  Anything else -- not gzip,
    truncated, another type, a size that disagrees with the data -- is a one-line DataError.
    """
    path = Path(path)
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise _missing(path, "file") from None
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise DataError(f"{path}: not a readable gzip-compressed IDX file ({exc})") from None
    header = 4 + 4 * ndim
    if len(raw) < 4:
        raise DataError(f"{path}: truncated IDX file ({len(raw)} bytes, no magic number)")
    if raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != ndim:
        raise DataError(f"{path}: not an IDX file of unsigned bytes with {ndim} dimension(s) "
                        f"(magic {raw[:4].hex()}, expected 000008{ndim:02x})")
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX file ({len(raw)} bytes, header needs {header})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != expected:
        raise DataError(f"{path}: IDX header announces shape {list(dims)} ({expected} bytes) "
                        f"but the file holds {len(raw) - header} data bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


@dataclass(frozen=True)
class _Part:
    """One Fashion-MNIST part (train or t10k): images [N, 28, 28] and fine labels [N]."""

    name: str
    images: Array
    labels: Array


def _stat_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=4)
def _load_part_cached(name: str, images_key: tuple[str, int, int],
                      labels_key: tuple[str, int, int]) -> _Part:
    images_path, labels_path = Path(images_key[0]), Path(labels_key[0])
    images = read_idx(images_path, 3)
    labels = read_idx(labels_path, 1)
    if images.shape[1:] != (SOURCE_SIDE, SOURCE_SIDE):
        raise DataError(f"{images_path}: images are {images.shape[1]}x{images.shape[2]}, "
                        f"Fashion-MNIST's are {SOURCE_SIDE}x{SOURCE_SIDE}")
    if len(labels) != len(images):
        raise DataError(f"{labels_path}: {len(labels)} labels for {len(images)} images in "
                        f"{images_path.name}")
    if len(labels) and int(labels.max()) >= len(FINE_NAMES):
        raise DataError(f"{labels_path}: label {int(labels.max())} outside 0..9")
    if len(images) < 2:
        raise DataError(f"{images_path}: only {len(images)} image(s)")
    return _Part(name, images, labels)


def load_part(idx_dir: str | Path, name: str) -> _Part:
    """The ``train`` or ``t10k`` part of the IDX files in ``idx_dir`` (cached per process)."""
    paths = idx_paths(idx_dir)
    return _load_part_cached(name, _stat_key(paths[f"{name}-images"]),
                             _stat_key(paths[f"{name}-labels"]))


@functools.lru_cache(maxsize=16)
def _file_sha256(key: tuple[str, int, int]) -> str:
    # Keyed by (path, size, mtime) so the cache never serves a replaced file's digest.
    return file_sha256(Path(key[0]))


def source_digests(idx_dir: str | Path) -> dict[str, str]:
    """SHA-256 of each IDX file and of each background photo: the identity of the sources."""
    out = {f"idx/{p.name}": _file_sha256(_stat_key(p)) for p in idx_paths(idx_dir).values()}
    for name, photo in _backgrounds().items():
        out[f"skimage/{name}"] = photo.digest
    return out


# --------------------------------------------------------------------------------------------
# Background photos
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Photo:
    pixels: Array  # uint8 [H, W] (grayscale) or [H, W, 3]
    digest: str


@functools.lru_cache(maxsize=1)
def _backgrounds() -> dict[str, _Photo]:
    """scikit-image's bundled photographs (no download: they ship inside the wheel)."""
    try:
        from skimage import data as skdata
    except ImportError:
        raise DataError("the fashion dataset needs scikit-image's bundled photos as "
                        "backgrounds: pip install scikit-image") from None
    out: dict[str, _Photo] = {}
    for name in BACKGROUNDS:
        try:
            pixels = np.ascontiguousarray(getattr(skdata, name)())
        except Exception as exc:  # a loader that needs a download, a missing file
            raise DataError(f"scikit-image's photo {name!r} is not available ({exc}); "
                            "reinstall scikit-image") from None
        if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3):
            raise DataError(f"scikit-image's photo {name!r} has an unexpected format "
                            f"({pixels.dtype}, shape {pixels.shape})")
        if pixels.ndim == 3:
            pixels = np.ascontiguousarray(pixels[..., :3])
        digest = hashlib.sha256(str(pixels.shape).encode() + pixels.tobytes()).hexdigest()
        out[name] = _Photo(pixels, digest)
    return out


def _hsv(h: float, s: float, v: float) -> Array:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _background(rng: np.random.Generator, size: int) -> tuple[Array, dict[str, Any]]:
    """A random crop of a random photo, resized to ``size``; float32 RGB and a description."""
    photos = _backgrounds()
    name = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    pixels = photos[name].pixels
    h, w = pixels.shape[:2]
    short = min(h, w)
    side = int(rng.integers(max(8, short // 4), max(9, (3 * short) // 4 + 1)))
    y0, x0 = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
    rot, mirror = int(rng.integers(4)), bool(rng.random() < 0.5)
    crop = np.rot90(pixels[y0:y0 + side, x0:x0 + side], rot)
    if mirror:
        crop = crop[:, ::-1]
    img = Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.float32)
    if arr.ndim == 2:
        # A grayscale texture gets a random, mostly muted colour so that it is RGB like the rest.
        tint = _hsv(rng.random(), rng.uniform(0.0, 0.35), 1.0) * np.float32(rng.uniform(0.7, 1.1))
        arr = arr[..., None] * tint
        info_tint: list[float] | None = [round(float(t), 4) for t in tint]
    else:
        arr = arr * np.float32(rng.uniform(0.8, 1.1))
        info_tint = None
    info = {"photo": name, "crop": [y0, x0, side], "rot90": rot, "mirror": mirror,
            "tint": info_tint}
    return arr, info


# --------------------------------------------------------------------------------------------
# Items: interpolation and the mask rule
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _interp_matrix(size: int, source: int = SOURCE_SIDE) -> Array:
    """``[size, source]`` bilinear weights, half-pixel centres, edge-clamped.

    Output pixel ``i`` samples the source at ``(i + 0.5) * source / size - 0.5`` (clamped to
    ``0``), between pixels ``floor`` and ``floor + 1`` (the last pixel repeats): exactly
    ``torch.nn.functional.interpolate(..., mode="bilinear", align_corners=False)``.
    """
    pos = (np.arange(size, dtype=np.float64) + 0.5) * (source / size) - 0.5
    pos = np.maximum(pos, 0.0)
    i0 = np.minimum(np.floor(pos).astype(np.int64), source - 1)
    i1 = np.minimum(i0 + 1, source - 1)
    frac = pos - i0
    m = np.zeros((size, source), dtype=np.float64)
    rows = np.arange(size)
    np.add.at(m, (rows, i0), 1.0 - frac)
    np.add.at(m, (rows, i1), frac)
    m.setflags(write=False)
    return m


def upscale(item: Array, size: int) -> Array:
    """Bilinear up-scaling of a 28x28 uint8 item to ``size`` x ``size`` float64 (0..255).

    Separable: ``W @ item @ W.T``.  Rounded to 1e-4 so that a value that is mathematically at the
    threshold compares the same whatever the floating-point summation order.
    """
    if item.shape != (SOURCE_SIDE, SOURCE_SIDE):
        raise ValueError(f"item must be {SOURCE_SIDE}x{SOURCE_SIDE}, got {item.shape}")
    if size < SOURCE_SIDE:
        raise ValueError(f"items are only enlarged (size >= {SOURCE_SIDE}), got {size}")
    w = _interp_matrix(size)
    return np.round(w @ item.astype(np.float64) @ w.T, 4)


_EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity for the item
_FOUR = ndimage.generate_binary_structure(2, 1)  # 4-connectivity for the background


def item_mask(up: Array, threshold: float = 16.0, min_speck_px: int = 10,
              min_hole_px: int = 3) -> Array:
    """The mask of one up-scaled item (see the module docstring, "Mask rule").

    ``up`` is the up-scaled intensity (``upscale``); sizes are in up-scaled pixels.  Foreground
    is 8-connected and background 4-connected (the usual complementary pair, so a diagonal
    strap is one piece and a diagonal gap does not leak a hole into the outside).
    """
    fg = up >= threshold
    labels, n = ndimage.label(fg, structure=_EIGHT)
    if n:
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        keep = sizes >= min_speck_px
        keep[0] = False
        fg = keep[labels]
    # Holes: background regions that do not reach the item square's border (padding with
    # background makes the outside one connected region, label of the corner).
    bg_labels, nb = ndimage.label(~np.pad(fg, 1), structure=_FOUR)
    if nb > 1:
        sizes = np.bincount(bg_labels.ravel(), minlength=nb + 1)
        outside = bg_labels[0, 0]
        fill = sizes < min_hole_px
        fill[0] = False
        fill[outside] = False
        fg = fg | fill[bg_labels[1:-1, 1:-1]]
    return fg


def item_alpha(up: Array, mask: Array, threshold: float) -> Array:
    """Opacity of an item: 1 on its mask, ``v / threshold`` on the 1-px fringe below threshold."""
    fringe = ndimage.binary_dilation(mask, structure=_EIGHT) & ~mask & (up < threshold)
    return np.where(mask, 1.0, np.where(fringe, up / threshold, 0.0)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------------


class _SplitSource:
    """The source part of one split and its per-class pools in seeded order."""

    def __init__(self, spec: FashionSpec, split: str) -> None:
        part_name, lo_frac, hi_frac = SPLIT_SOURCES[split]
        self.part = load_part(spec.idx_dir, part_name)
        n = len(self.part.labels)
        self.lo, self.hi = int(n * lo_frac), int(n * hi_frac)
        images = self.part.images[self.lo:self.hi]
        ink = (images >= spec.threshold).sum(axis=(1, 2))
        fine = self.part.labels[self.lo:self.hi]
        self.pools: list[Array] = []
        for c, fines in enumerate(SUBTYPES):
            pool = np.flatnonzero(np.isin(fine, fines) & (ink >= MIN_SOURCE_INK)) + self.lo
            if not len(pool):
                raise DataError(f"{spec.idx_dir}: no usable {CLASS_NAMES[c]!r} items in "
                                f"{part_name} {self.lo}..{self.hi - 1} for split {split!r}")
            perm = np.random.default_rng([spec.seed, _SPLIT_CODES[split], 2, c]).permutation(
                len(pool))
            self.pools.append(pool[perm])

    def pick(self, cls: int, slot: int) -> int:
        pool = self.pools[cls]
        return int(pool[slot % len(pool)])


@dataclass
class Scene:
    """One rendered image with its ground truth."""

    image: Array  # uint8 [H, W, 3]
    mask: Array  # uint8 [H, W], 0..C
    labels: list[int]  # 0-based classes present in the mask
    subtypes: list[int]  # per class: sub-type of the largest visible item, -1 if absent
    items: list[dict[str, Any]]  # placed items in paste order
    background: dict[str, Any]


def _n_items(rng: np.random.Generator, max_items: int) -> int:
    # As the synthetic set: single-item images are most common, multi-label ones frequent.
    w = 0.6 ** np.arange(max_items)
    return int(rng.choice(max_items, p=w / w.sum())) + 1


def _primary_class(spec: FashionSpec, split: str, index: int) -> int:
    """Class of an image's first item: a fresh permutation of the classes per block of C."""
    c = len(CLASS_NAMES)
    perm = np.random.default_rng([spec.seed, _SPLIT_CODES[split], 1, index // c]).permutation(c)
    return int(perm[index % c])


def _compose(placed: list[dict[str, Any]], size: int) -> Array:
    """Item-id map (0 background, k = placed[k-1]); later items on top."""
    ids = np.zeros((size, size), dtype=np.int16)
    for k, item in enumerate(placed, start=1):
        y, x, s = item["y"], item["x"], item["size"]
        ids[y:y + s, x:x + s][item["_mask"]] = k
    return ids


def render_scene(spec: FashionSpec, split: str, index: int,
                 source: _SplitSource | None = None) -> Scene:
    """Draw image ``index`` of ``split`` (a pure function of options, sources, split, index)."""
    src = source or _SplitSource(spec, split)
    size = spec.image_size
    rng = np.random.default_rng([spec.seed, _SPLIT_CODES[split], 0, index])
    n = _n_items(rng, spec.max_items)
    wanted = [_primary_class(spec, split, index)]
    wanted += [int(c) for c in rng.integers(len(CLASS_NAMES), size=n - 1)]
    background, bg_info = _background(rng, size)

    placed: list[dict[str, Any]] = []
    for j, cls in enumerate(wanted):
        src_index = src.pick(cls, index * spec.max_items + j)
        fine = int(src.part.labels[src_index])
        flip = bool(rng.random() < 0.5)
        side = int(rng.integers(spec.min_item_px, spec.max_item_px + 1))
        pixels = src.part.images[src_index]
        up = upscale(pixels[:, ::-1] if flip else pixels, side)
        mask = item_mask(up, spec.threshold, spec.min_speck_px, spec.min_hole_px)
        tint = _hsv(rng.random(), rng.uniform(0.15, 0.75), 1.0) * np.float32(rng.uniform(0.8, 1.0))
        area = int(mask.sum())
        for _ in range(PLACEMENT_TRIES):
            y, x = (int(v) for v in rng.integers(0, size - side + 1, 2))
            item = {"source": src.part.name, "index": src_index, "fine": fine,
                    "fine_name": FINE_NAMES[fine], "class": FINE_TO_CLASS[fine],
                    "subtype": FINE_TO_SUBTYPE[fine], "flip": flip, "size": side, "y": y, "x": x,
                    "area": area, "tint": [round(float(t), 4) for t in tint],
                    "_up": up, "_mask": mask}
            trial = placed + [item]
            counts = np.bincount(_compose(trial, size).ravel(), minlength=len(trial) + 1)
            if all(counts[k] >= spec.min_visible * it["area"]
                   for k, it in enumerate(trial, start=1)):
                placed = trial
                break
        # An item that fits nowhere is dropped; the first always fits (nothing to occlude).

    img = background
    for item in placed:
        y, x, s = item["y"], item["x"], item["size"]
        up = item["_up"]
        alpha = item_alpha(up, item["_mask"], spec.threshold)[..., None]
        # Fashion-MNIST stores negatives: 255 - v is the product photo's brightness.
        colour = ((255.0 - up) / 255.0).astype(np.float32)[..., None] * np.asarray(
            item["tint"], np.float32) * np.float32(255.0)
        box = img[y:y + s, x:x + s]
        img[y:y + s, x:x + s] = alpha * colour + (1.0 - alpha) * box
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)

    ids = _compose(placed, size)
    counts = np.bincount(ids.ravel(), minlength=len(placed) + 1)
    lut = np.array([0] + [it["class"] + 1 for it in placed], dtype=np.uint8)
    mask = lut[ids]
    # Labels are read back from the mask, never from what was intended.
    labels = sorted(int(v) - 1 for v in np.unique(mask) if v > 0)
    for k, it in enumerate(placed, start=1):
        it["visible"] = int(counts[k])
    items = [{k: v for k, v in it.items() if not k.startswith("_")} for it in placed]
    return Scene(image, mask, labels, largest_visible_subtypes(items), items, bg_info)


def largest_visible_subtypes(items: list[dict[str, Any]]) -> list[int]:
    """Per class: the sub-type of its largest visible item (ties: earliest in ``items``), or -1.

    ``items`` are in paste order with ``class``, ``subtype`` and ``visible`` (pixel count in the
    final mask); an item with no visible pixel does not count, so -1 exactly when the class has
    no pixel in the mask.
    """
    subtypes = [-1] * len(CLASS_NAMES)
    best = [0] * len(CLASS_NAMES)
    for it in items:
        # Strictly larger wins, so on a tie the earliest pasted item keeps the class.
        if it["visible"] > best[it["class"]]:
            best[it["class"]] = it["visible"]
            subtypes[it["class"]] = it["subtype"]
    return subtypes


# --------------------------------------------------------------------------------------------
# Writing the dataset
# --------------------------------------------------------------------------------------------


def image_id(split: str, index: int) -> str:
    """Id of image ``index`` of ``split``: ``fmn_`` + six digits (split offset + index)."""
    return f"{ID_PREFIX}{ID_OFFSETS[split] + index:06d}"


def split_ids(spec: FashionSpec) -> dict[str, list[str]]:
    """Ids of every split file (``train`` is the first ``n_train`` of ``train_aug``)."""
    train_aug = [image_id("train_aug", i) for i in range(spec.n_train_aug)]
    return {
        "train_aug": train_aug,
        "train": train_aug[: spec.n_train],
        "val": [image_id("val", i) for i in range(spec.n_val)],
        "select": [image_id("select", i) for i in range(spec.n_select)],
    }


def _iter_scenes(spec: FashionSpec) -> Iterator[tuple[str, str, Scene]]:
    for split, n in (("train_aug", spec.n_train_aug), ("val", spec.n_val),
                     ("select", spec.n_select)):
        if not n:
            continue
        source = _SplitSource(spec, split)
        for i in range(n):
            yield split, image_id(split, i), render_scene(spec, split, i, source)


def subtype_document(labels: dict[str, list[int]]) -> dict[str, Any]:
    """The ``subtype_labels.json`` document (format ``wsss_bench.subtypes/1``)."""
    return {
        "format": SUBTYPES_FORMAT,
        "num_subtypes": [len(f) for f in SUBTYPES],
        "subtype_names": [[FINE_NAMES[f] for f in fines] for fines in SUBTYPES],
        "labels": labels,
    }


def _write_tree(root: Path, spec: FashionSpec, sources: dict[str, str]) -> dict[str, Any]:
    """Write the whole dataset into ``root`` (a fresh folder); return fashion.json content."""
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClassAug").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    digests: dict[str, str] = {}

    def put(rel: str, data: bytes) -> None:
        (root / rel).write_bytes(data)
        digests[rel] = hashlib.sha256(data).hexdigest()

    labels: dict[str, list[int]] = {}
    subtypes: dict[str, list[int]] = {}
    items: dict[str, Any] = {}
    for _, iid, scene in _iter_scenes(spec):
        put(f"JPEGImages/{iid}.jpg", _encode_jpeg(scene.image, spec.jpeg_quality))
        put(f"SegmentationClassAug/{iid}.png", _encode_png(scene.mask))
        labels[iid], subtypes[iid] = scene.labels, scene.subtypes
        items[iid] = {"background": scene.background, "items": scene.items}
    splits = split_ids(spec)
    for split, ids in splits.items():
        put(f"ImageSets/Segmentation/{split}.txt", "".join(i + "\n" for i in ids).encode())
    put("class_names.txt", "".join(n + "\n" for n in CLASS_NAMES).encode())
    put("cls_labels.json", _dump_json(labels))
    # Key order as documented (format, num_subtypes, subtype_names, labels); ids in split order.
    put("subtype_labels.json", _dump_json(subtype_document(subtypes), sort_keys=False))
    put("items.json", _dump_json(items))

    content = hashlib.sha256()
    for rel in sorted(digests):
        content.update(f"{rel}\0{digests[rel]}\n".encode())
    ranges = {}
    for split, (part, lo, hi) in SPLIT_SOURCES.items():
        n = len(load_part(spec.idx_dir, part).labels)
        ranges[split] = {"part": part, "first": int(n * lo), "end": int(n * hi)}
    per_class = {name: sum(c in labels[i] for i in splits["train_aug"])
                 for c, name in enumerate(CLASS_NAMES)}
    meta = {
        "generator": GENERATOR,
        "format_version": FORMAT_VERSION,
        "spec": spec.model_dump(),
        "spec_fingerprint": spec.fingerprint(sources),
        "sources": sources,
        "content_sha256": content.hexdigest(),
        "class_names": list(CLASS_NAMES),
        "subtype_names": [[FINE_NAMES[f] for f in fines] for fines in SUBTYPES],
        "splits": {k: len(v) for k, v in splits.items()},
        "source_ranges": ranges,
        "train_aug_images_per_class": per_class,
        "mask_rule": {
            "interpolation": "bilinear, half-pixel centres, edge-clamped (align_corners=False), "
                             "float64 rounded to 1e-4",
            "threshold": spec.threshold, "foreground_connectivity": 8,
            "min_speck_px": spec.min_speck_px, "background_connectivity": 4,
            "min_hole_px": spec.min_hole_px,
        },
    }
    # fashion.json is written last: its presence marks the tree as complete.
    (root / "fashion.json").write_bytes(_dump_json(meta))
    return meta


def _read_meta(root: Path) -> dict[str, Any] | None:
    return read_marker(root, "fashion.json")


def is_complete(root: Path, spec: FashionSpec, fingerprint: str | None = None) -> bool:
    """True if ``root`` holds the complete tree of ``spec`` (and the current sources)."""
    root = Path(root)
    fingerprint = fingerprint or spec.fingerprint(source_digests(spec.idx_dir))
    meta = _read_meta(root)
    if (meta is None or meta.get("generator") != GENERATOR
            or meta.get("format_version") != FORMAT_VERSION
            or meta.get("spec_fingerprint") != fingerprint):
        return False
    # Cheap existence check (no re-hashing): catches files deleted by hand after generation.
    ids = split_ids(spec)
    for iid in ids["train_aug"] + ids["val"] + ids["select"]:
        if not ((root / "JPEGImages" / f"{iid}.jpg").is_file()
                and (root / "SegmentationClassAug" / f"{iid}.png").is_file()):
            return False
    rels = ["class_names.txt", "cls_labels.json", "subtype_labels.json", "items.json"]
    rels += [f"ImageSets/Segmentation/{s}.txt" for s in ids]
    return all((root / rel).is_file() for rel in rels)


def _generate(out: Path, spec: FashionSpec) -> tuple[Path, bool]:
    """Like :func:`generate`; the flag tells whether files were written (False = reused)."""
    sources = source_digests(spec.idx_dir)  # fails first, with the install hint, if absent
    fingerprint = spec.fingerprint(sources)

    return install_tree(Path(out), lambda tmp: _write_tree(tmp, spec, sources),
                        lambda f: is_complete(f, spec, fingerprint),
                        lambda f: replaceable(f, "fashion.json", GENERATOR), "fashion dataset")


def generate(out: Path, spec: FashionSpec) -> Path:
    """Write the dataset of ``spec`` into ``out`` atomically and return ``out``.

    The tree is built in ``<out>.tmp-<pid>`` and renamed into place, so a crash never leaves a
    partial tree at ``out``; ``fashion.json`` (the completeness marker) is its last file.  An
    ``out`` that already holds the complete tree of the same fingerprint is returned untouched;
    one that is neither empty nor a fashion dataset raises :class:`UserError`.  Missing IDX
    files raise :class:`DataError` naming ``apt-get install dataset-fashion-mnist``.
    """
    return _generate(out, spec)[0]


# --------------------------------------------------------------------------------------------
# Plugin object and registration
# --------------------------------------------------------------------------------------------


class FashionDataset:
    """Dataset plugin object: generates (or reuses) the Fashion-MNIST scene tree on ``prepare``."""

    def __init__(self, **options: Any) -> None:
        try:
            self.spec = FashionSpec(**options)
        except ValidationError as exc:
            raise ConfigError(options_error("fashion dataset options: ", exc)) from None
        self.class_names: list[str] = list(CLASS_NAMES)

    @property
    def fingerprint(self) -> str:
        """Options-and-sources fingerprint; names the cache folder (reads the IDX files)."""
        return self.spec.fingerprint(source_digests(self.spec.idx_dir))

    def prepare(self, root: Path | None, cache_dir: Path) -> Path:
        """Return the dataset root, generating it if needed.

        With ``root`` given the dataset lives there; otherwise in
        ``cache_dir / f"fashion-{fingerprint}"`` so different options never collide.
        """
        out = Path(root) if root is not None else Path(cache_dir) / f"fashion-{self.fingerprint}"
        return generate(out, self.spec)


#: What the conformance kit (wsss_bench.testing) builds: a tiny tree, not the default one.
FashionDataset.conformance_cases = [("fashion", {"n_train_aug": 8, "n_train": 4, "n_val": 4, "n_select": 0, "image_size": 48})]  # type: ignore[attr-defined]


@hookimpl
def register_datasets(register: Callable[..., None]) -> None:
    """Register the ``fashion`` dataset."""
    register("fashion", FashionDataset,
             help="Fashion-MNIST product photos on real textures, 4 parent classes with known "
                  f"sub-types (VOC layout; needs {INSTALL_HINT})",
             options=FashionOptions)


def _describe(spec: FashionSpec, written: bool) -> str:
    return (f"{'generated' if written else 'reused'} fashion dataset "
            f"{spec.fingerprint(source_digests(spec.idx_dir))}: {spec.n_train_aug} train_aug "
            f"({spec.n_train} train) + {spec.n_val} val + {spec.n_select} select images, "
            f"{len(CLASS_NAMES)} classes ({', '.join(CLASS_NAMES)}), "
            f"{spec.image_size}x{spec.image_size}, seed {spec.seed}")


def _make_fashion_command() -> click.Command:
    return generator_command("fashion", "Generate the Fashion-MNIST scene dataset (VOC layout) into --out.",
                             FashionSpec, "fashion: ", _generate, _describe)


@hookimpl
def register_commands(cli: click.Group) -> None:
    """Add ``wsss data fashion`` (creating the ``data`` group if neither core nor plugin has)."""
    add_data_command(cli, _make_fashion_command())


__all__ = [
    "BACKGROUNDS", "CLASS_NAMES", "FINE_NAMES", "FORMAT_VERSION", "FashionDataset",
    "FashionOptions", "FashionSpec", "SUBTYPES", "Scene", "generate", "idx_paths",
    "is_complete", "item_alpha", "item_mask", "largest_visible_subtypes", "load_part",
    "read_idx", "register_commands", "register_datasets", "render_scene", "source_digests",
    "split_ids", "subtype_document", "upscale",
]
