"""Reading a PASCAL VOC-layout tree: split lists, images, index masks, image-level labels.

Every dataset, real or synthetic, ends up as such a tree::

    ROOT/JPEGImages/<id>.jpg
    ROOT/SegmentationClassAug/<id>.png     index PNG: 0 = background, 1..C, 255 = ignore
    ROOT/SegmentationClass/<id>.png        VOC palette PNG (used when there is no ...Aug folder)
    ROOT/ImageSets/Segmentation/<split>.txt
    ROOT/class_names.txt                   optional: foreground names, one per line (else VOC's 20)
    ROOT/cls_labels.json                   optional: {id: [0-based foreground classes]}
    ROOT/subtype_labels.json               optional: true sub-types (wsss_bench.data.subtypes)

Split lines may be bare ids (``2007_000032``) or PSA/SC-CAM pairs
(``/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png``).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    from .subtypes import SubtypeTruth

VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
]
IGNORE_INDEX = 255


def voc_palette(count: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map ``[count, 3]`` uint8, the one palette of the package.

    Bits 0, 1, 2 of the index go to the most significant bit of R, G, B, bits 3, 4, 5 to the
    next one, and so on: black background, (128, 0, 0) for class 1, ... and (224, 224, 192)
    for the 255 "ignore" label, as in VOC's own PNGs.
    """
    palette = np.zeros((count, 3), np.uint8)
    for index in range(count):
        r = g = b = 0
        bits = index
        for shift in range(7, -1, -1):
            r |= (bits & 1) << shift
            g |= ((bits >> 1) & 1) << shift
            b |= ((bits >> 2) & 1) << shift
            bits >>= 3
        palette[index] = (r, g, b)
    return palette
IMAGE_DIR = "JPEGImages"
MASK_DIRS = ("SegmentationClassAug", "SegmentationClass")
SPLIT_DIR = Path("ImageSets") / "Segmentation"
_SAFE_ID = re.compile(r"^[A-Za-z0-9_.\-]+$")
#: The longest suffix an id gets in a file name (``<id>.jpg``, ``<id>.png``, ``<id>.npz``, and the
#: ``.<id>.npz.<random>.tmp`` of an atomic write).
_LONGEST_SUFFIX = len(".") + len(".npz.") + 8 + len(".tmp")


def name_limit(folder: Path) -> int:
    """The longest file name (bytes) the file system of ``folder`` takes (255 where unknown)."""
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows) or an unknown folder
        return 255


def check_root(root: Path) -> Path:
    """Fail clearly unless ``root`` looks like a VOC-layout tree."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: data root does not exist")
    if not root.is_dir():
        raise DataError(f"{root}: data root is not a directory")
    if not (root / IMAGE_DIR).is_dir():
        hint = ""
        if (root / "VOC2012" / IMAGE_DIR).is_dir() or (root / "VOCdevkit").is_dir():
            hint = " (point --data-root at the VOC2012 folder itself)"
        raise DataError(f"{root}: not a VOC-layout tree, no {IMAGE_DIR}/ folder{hint}")
    return root


def available_splits(root: Path) -> list[str]:
    """Names of the split lists under ``ImageSets/Segmentation``."""
    folder = Path(root) / SPLIT_DIR
    return sorted(p.stem for p in folder.glob("*.txt")) if folder.is_dir() else []


def _id_from_line(line: str) -> str:
    token = line.split()[0]
    if "/" in token or "\\" in token:
        # PSA/SC-CAM lists: "/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png"
        parent, _, base = token.replace("\\", "/").rpartition("/")
        if parent.strip("/") != IMAGE_DIR or "." not in base:
            raise ValueError(token)
        return base.rsplit(".", 1)[0]
    return token


def read_split(root: Path, split: str) -> list[str]:
    """Image ids of ``split``, validated: no empty list, duplicates, or unsafe ids."""
    if not _SAFE_ID.match(split):
        raise DataError(f"invalid split name {split!r}")
    path = Path(root) / SPLIT_DIR / f"{split}.txt"
    if not path.is_file():
        known = ", ".join(available_splits(root)) or "none"
        hint = ""
        if split == "train_aug":
            # VOC 2012 ships train/val only; train_aug is the SBD-augmented list PSA/SC-CAM train on.
            hint = ("; train_aug is the SBD-augmented training list (10,582 ids, from the SBD "
                    "release), not part of VOC 2012 itself: add it, or train on another split with "
                    "--set dataset.train_split=train")
        raise DataError(f"{path}: split list not found (available splits: {known}){hint}")
    ids: list[str] = []
    seen: dict[str, int] = {}
    longest = name_limit(path.parent) - _LONGEST_SUFFIX
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            image_id = _id_from_line(line)
        except ValueError:
            raise DataError(f"{path}:{number}: cannot read an image id from {line.strip()!r}") from None
        if image_id in (".", "..") or not _SAFE_ID.match(image_id):
            raise DataError(f"{path}:{number}: unsafe image id {image_id!r} (path separators and "
                            "'..' are not allowed)")
        if len(image_id.encode()) > longest:
            raise DataError(f"{path}:{number}: image id of {len(image_id)} characters; with its file "
                            f"suffix it is longer than the file system's name limit ({longest} "
                            "characters at most)")
        if image_id in seen:
            raise DataError(f"{path}:{number}: duplicate id {image_id!r} (first on line {seen[image_id]})")
        seen[image_id] = number
        ids.append(image_id)
    if not ids:
        raise DataError(f"{path}: split {split!r} is empty")
    return ids


def read_class_names(root: Path) -> list[str]:
    """Foreground class names from ``class_names.txt`` (a leading background line is dropped)."""
    path = Path(root) / "class_names.txt"
    if not path.is_file():
        return list(VOC_CLASSES)
    names = [n.strip() for n in path.read_text().splitlines() if n.strip()]
    if names and names[0].lower() in ("background", "bg", "_background_"):
        names = names[1:]
    if not names:
        raise DataError(f"{path}: no class names")
    if len(names) > 254:
        raise DataError(f"{path}: {len(names)} classes; at most 254 fit an 8-bit mask with 255 = ignore")
    return names


#: What PIL raises for a file it cannot decode (DecompressionBombError is none of the others).
DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def open_image(path: Path) -> Image.Image:
    """Decode an RGB image fully, turning any decoding failure into a one-line DataError."""
    if not path.is_file():
        raise DataError(f"{path}: image listed in the split but missing")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except DECODE_ERRORS as exc:
        raise decode_error(path, exc, "image") from None


def decode_error(path: Path, exc: Exception, what: str) -> DataError:
    """The one-line error for an image or mask PIL could not decode."""
    if isinstance(exc, Image.DecompressionBombError):
        size = str(exc).split(", could be")[0].rstrip(".")
        return DataError(f"{path}: {what} too large to decode safely ({size}; "
                         "PIL.Image.MAX_IMAGE_PIXELS sets the limit)")
    return DataError(f"{path}: corrupt or unreadable {what} ({exc})")


def read_mask(path: Path, num_classes: int) -> np.ndarray:
    """An index mask as uint8 ``[H, W]``: palette PNGs give indices, never luminance."""
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in ("P", "L"):
                # For 'P' images np.asarray returns palette indices, which are the class ids:
                # reading VOC's palette PNGs as grayscale luminance is the classic IoU-near-zero bug.
                mask = np.array(img)
            elif mode in ("I", "I;16", "I;16B", "I;16L"):
                mask = np.array(img).astype(np.int64)
            else:
                raise DataError(f"{path}: mask has mode {mode}; expected a single-channel index "
                                "PNG or a palette PNG (RGB colour masks are not class indices)")
    except DECODE_ERRORS as exc:
        raise decode_error(path, exc, "mask") from None
    valid = (mask <= num_classes) | (mask == IGNORE_INDEX)
    if not valid.all():
        bad = np.unique(np.asarray(mask)[~valid])[:5].tolist()
        raise DataError(f"{path}: mask values {bad} outside 0..{num_classes} and 255")
    return mask.astype(np.uint8, copy=False)


def read_labels_file(path: Path, num_classes: int) -> dict[str, np.ndarray]:
    """Image-level labels from JSON ``{id: [0-based foreground class indices]}``."""
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: labels file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a JSON object {{id: [class indices]}}")
    labels: dict[str, np.ndarray] = {}
    for image_id, classes in raw.items():
        if not isinstance(classes, list) or not all(
                isinstance(c, int) and 0 <= c < num_classes for c in classes):
            raise DataError(f"{path}: labels of {image_id!r} must be a list of integers in "
                            f"0..{num_classes - 1}, got {classes!r}")
        vec = np.zeros(num_classes, np.float32)
        vec[classes] = 1.0
        labels[image_id] = vec
    return labels


@dataclass
class VOCDataset:
    """One split of a VOC-layout tree with image-level labels (and masks where present)."""

    root: Path
    split: str
    ids: list[str]
    class_names: list[str]
    labels: dict[str, np.ndarray] = field(repr=False)
    mask_dir: Optional[Path] = None

    @property
    def num_classes(self) -> int:
        """Number of foreground classes C (masks hold 0..C)."""
        return len(self.class_names)

    def image_path(self, image_id: str) -> Path:
        """Path of the JPEG of ``image_id``."""
        return self.root / IMAGE_DIR / f"{image_id}.jpg"

    def mask_path(self, image_id: str) -> Path:
        """Path of the ground-truth mask of ``image_id`` (may not exist)."""
        if self.mask_dir is None:
            raise DataError(f"{self.root}: no SegmentationClassAug/ or SegmentationClass/ folder, "
                            "so there is no pixel ground truth")
        return self.mask_dir / f"{image_id}.png"

    def load_image(self, image_id: str) -> Image.Image:
        """The RGB image."""
        return open_image(self.image_path(image_id))

    def image_size(self, image_id: str) -> tuple[int, int]:
        """(W, H) of the image, read from its header only."""
        path = self.image_path(image_id)
        try:
            with Image.open(path) as img:
                return img.size
        except FileNotFoundError:
            raise DataError(f"{path}: image listed in the split but missing") from None
        except DECODE_ERRORS as exc:
            raise decode_error(path, exc, "image") from None

    def load_mask(self, image_id: str, size: Optional[tuple[int, int]] = None) -> np.ndarray:
        """The mask as uint8 ``[H, W]``; ``size`` (W, H) is checked when given."""
        path = self.mask_path(image_id)
        if not path.is_file():
            raise DataError(f"{path}: ground-truth mask missing for {image_id!r}")
        mask = read_mask(path, self.num_classes)
        if size is not None and (mask.shape[1], mask.shape[0]) != tuple(size):
            raise DataError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is "
                            f"{size[0]}x{size[1]}")
        return mask

    def label(self, image_id: str) -> np.ndarray:
        """Multi-hot float32 ``[C]`` image-level label."""
        return self.labels[image_id]

    def subtype_truth(self) -> Optional["SubtypeTruth"]:
        """The tree's declared true sub-types (``subtype_labels.json``), or None when it has none."""
        from .subtypes import read_subtype_truth

        return read_subtype_truth(self.root, self.num_classes)

    def subset(self, limit: Optional[int]) -> "VOCDataset":
        """The first ``limit`` ids (all when ``limit`` is None)."""
        if limit is None or limit >= len(self.ids):
            return self
        return VOCDataset(self.root, self.split, self.ids[:limit], self.class_names, self.labels,
                          self.mask_dir)


def _derive_labels(root: Path, mask_dir: Optional[Path], ids: list[str],
                   num_classes: int) -> dict[str, np.ndarray]:
    labels = {}
    for image_id in ids:
        if mask_dir is None or not (mask_dir / f"{image_id}.png").is_file():
            raise DataError(f"{root}: no image-level labels for {image_id!r}: give a labels file "
                            "(cls_labels.json) or a mask in SegmentationClassAug/")
        mask = read_mask(mask_dir / f"{image_id}.png", num_classes)
        present = np.unique(mask)
        vec = np.zeros(num_classes, np.float32)
        fg = present[(present >= 1) & (present <= num_classes)].astype(np.int64) - 1
        vec[fg] = 1.0
        labels[image_id] = vec
    return labels


def open_split(root: Path, split: str, labels_file: Optional[Path] = None,
               class_names: Optional[list[str]] = None) -> VOCDataset:
    """Open one split, checking that every listed image exists and has a label."""
    root = check_root(root)
    ids = read_split(root, split)
    names = class_names or read_class_names(root)
    mask_dir = next((root / d for d in MASK_DIRS if (root / d).is_dir()), None)
    missing = [i for i in ids if not (root / IMAGE_DIR / f"{i}.jpg").is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"{root / IMAGE_DIR / (missing[0] + '.jpg')}: image listed in split "
                        f"{split!r} but missing{more}")
    labels_path = labels_file or (root / "cls_labels.json")
    if labels_file is not None or labels_path.is_file():
        labels = read_labels_file(labels_path, len(names))
        unlabelled = [i for i in ids if i not in labels]
        derived = _derive_labels(root, mask_dir, unlabelled, len(names)) if unlabelled else {}
        labels = {**{i: labels[i] for i in ids if i in labels}, **derived}
    else:
        labels = _derive_labels(root, mask_dir, ids, len(names))
    return VOCDataset(root, split, ids, names, labels, mask_dir)
