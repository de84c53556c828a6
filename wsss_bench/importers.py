"""Convert CAM files written by other WSSS code bases into our ``<id>.npz`` format.

Supported input formats (one ``<id>.npy`` per image in a flat folder; other files are skipped):

``irn``
    IRN and its descendants (``make_cam.py``): ``np.save`` of a pickled dict
    ``{"keys": [n] 0-based foreground ids, "cam": [n, h, w] stride-4 maps,
    "high_res": [n, H, W] full-resolution maps}``; the arrays may be torch tensors.  IRN
    stores ``keys`` *without* background and pads it only at evaluation time
    (``np.pad(keys + 1, (1, 0))``).  Some variants save the padded form instead; it is
    recognised when there is exactly one more key than maps and the first key is 0, and is
    turned back into 0-based foreground ids.  (Padded keys *together with* a padded background
    map cannot be told apart from a plain file whose first class is 0, so they are not
    detected.)  ``high_res`` is used; without it, the stride-4 ``cam`` is upsampled bilinearly
    to the image size read from ``--size-from`` (an approximation of IRN's own high-res maps).
``psa`` / ``sccam``
    PSA's ``--out_cam`` and SC-CAM's ``output_CAM_npy/cls_20``: a pickled dict
    ``{class_index (0-based): [H, W] map}``, no background.  SC-CAM's saved maps are binarised
    to {0, 255} by a heat-map bug; such maps are detected (in every format), scaled 255 -> 1
    and reported: they are thresholded heat maps, not continuous CAMs.
``npy-dir``
    Plain (never pickled) ``[C, H, W]`` arrays of dense per-class maps, zero for absent
    classes, optionally with a background channel first (``has_background``).  The kept
    classes are the image-level labels when a labels file or VOC root is given, else the
    classes whose map is not all zero.

Every map is then checked (finite, numeric) and brought into ``[0, 1]``: maps already in
range are kept (clipped to remove rounding), others are clipped at 0 and divided by their max
+ 1e-5 (the usual CAM normalisation) unless ``normalize=False``, which refuses them instead.

Pickled inputs run code when unpickled, so they are refused before loading unless
``trust_pickle=True``.  Conversion is all-or-nothing: outputs are staged in a hidden folder
inside the output folder and moved into place only after every input converted, so a bad
input leaves no partial output.  Nothing is ever deleted except our own staging files.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from .errors import CamFileError, DataError, UserError
from .evaluation.camfiles import RANGE_TOLERANCE, write_cam

FORMATS = ("irn", "psa", "sccam", "npy-dir")
PICKLED_FORMATS = ("irn", "psa", "sccam")
# The CAM normalisation used by PSA, SC-CAM and IRN: divide by the per-class max + 1e-5.
NORM_EPS = 1e-5
BINARY_HIGH = 255.0
PICKLE_HINT = "pickled files can run code when loaded; pass --trust-pickle only for files you trust"


class PickleRefusedError(CamFileError):
    """A pickled input met without ``trust_pickle``; never skipped, since every file would be."""


@dataclass
class ConvertedCam:
    """One input converted to our format, with what had to be done to it."""

    keys: np.ndarray  # int64 [n], sorted 0-based foreground ids
    cams: np.ndarray  # float32 [n, H, W] in [0, 1]
    binarised_maps: int = 0
    renormalised_maps: int = 0
    padded_keys: bool = False
    upsampled: bool = False


@dataclass
class ImportSummary:
    """What :func:`import_cams` did; ids are the input file stems."""

    fmt: str
    in_dir: Path
    out_dir: Path
    converted: list[str] = field(default_factory=list)
    binarised: list[str] = field(default_factory=list)
    binarised_maps: int = 0
    renormalised: list[str] = field(default_factory=list)
    renormalised_maps: int = 0
    padded_keys: list[str] = field(default_factory=list)
    upsampled: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file name, reason)

    def lines(self, max_skipped: int = 5) -> list[str]:
        """A human-readable summary, first line ``converted N files ...``."""
        out = [f"converted {len(self.converted)} files ({self.fmt}) from {self.in_dir} to "
               f"{self.out_dir}: {len(self.binarised)} binarised, {len(self.renormalised)} "
               f"renormalised, {len(self.skipped)} skipped"]
        if self.binarised:
            out.append(f"  binarised {{0, 255}} maps scaled to {{0, 1}}: {self.binarised_maps} maps "
                       f"in {len(self.binarised)} files (e.g. {self.binarised[0]})")
        if self.renormalised:
            out.append(f"  renormalised by per-class max: {self.renormalised_maps} maps in "
                       f"{len(self.renormalised)} files (e.g. {self.renormalised[0]})")
        if self.padded_keys:
            out.append(f"  background-padded IRN keys turned back into 0-based ids: "
                       f"{len(self.padded_keys)} files")
        if self.upsampled:
            out.append(f"  stride-4 'cam' upsampled to image size (no 'high_res'): "
                       f"{len(self.upsampled)} files")
        for name, reason in self.skipped[:max_skipped]:
            out.append(f"  skipped {name}: {reason}")
        if len(self.skipped) > max_skipped:
            out.append(f"  ... and {len(self.skipped) - max_skipped} more skipped")
        return out


# --------------------------------------------------------------------------------------------
# Loading .npy files safely


def _npy_kind(path: Path) -> str:
    """``"plain"``, ``"object"`` (pickled .npy) or ``"pickle"`` (a raw pickle), without unpickling.

    We parse the header ourselves rather than matching numpy's error messages, which change
    between versions.
    """
    from numpy.lib import format as npformat

    try:
        with open(path, "rb") as handle:
            head = handle.read(len(npformat.MAGIC_PREFIX))
            if head != npformat.MAGIC_PREFIX:
                # np.load(allow_pickle=True) falls back to pickle.load for non-npy files, so a
                # raw pickle (protocol >= 2 starts with 0x80) is as dangerous as an object array.
                if head[:1] == b"\x80":
                    return "pickle"
                raise CamFileError(f"{path}: not a .npy file")
            handle.seek(0)
            version = npformat.read_magic(handle)
            if version == (1, 0):
                _, _, dtype = npformat.read_array_header_1_0(handle)
            else:  # 2.0 and 3.0 share the layout; only the header string encoding differs
                _, _, dtype = npformat.read_array_header_2_0(handle)
    except CamFileError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise CamFileError(f"{path}: unreadable .npy file ({exc})") from None
    return "object" if dtype.hasobject else "plain"


def _load_plain(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise CamFileError(f"{path}: unreadable .npy file ({exc})") from None


def _load_pickled(path: Path) -> Any:
    try:
        try:
            obj = np.load(path, allow_pickle=True)
        except UnicodeDecodeError:
            # Python 2 pickles (old PSA installs) need latin1 to decode numpy's byte buffers.
            obj = np.load(path, allow_pickle=True, encoding="latin1")
    except Exception as exc:  # unpickling can raise anything (missing modules, bad opcodes, ...)
        raise CamFileError(f"{path}: cannot unpickle ({type(exc).__name__}: {exc})") from None
    if isinstance(obj, np.ndarray) and obj.dtype.hasobject and obj.ndim == 0:
        obj = obj.item()
    return obj


def load_pickled_dict(path: Path, trust_pickle: bool) -> dict:
    """Load a pickled ``dict`` from ``path``; refuse before unpickling unless ``trust_pickle``."""
    path = Path(path)
    kind = _npy_kind(path)
    if kind == "plain":
        arr = _load_plain(path)
        raise CamFileError(f"{path}: a plain {arr.dtype} array {tuple(arr.shape)}, expected a "
                           "pickled dict (is this --format npy-dir?)")
    if not trust_pickle:
        raise PickleRefusedError(f"{path}: refused to load pickled data: {PICKLE_HINT}")
    obj = _load_pickled(path)
    if not isinstance(obj, dict):
        raise CamFileError(f"{path}: pickle holds a {type(obj).__name__}, expected a dict")
    return obj


def _to_numpy(value: Any, path: Path, what: str) -> np.ndarray:
    # IRN saves torch tensors inside its dict; convert without importing torch ourselves.
    if type(value).__module__.startswith("torch") and hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    try:
        arr = np.asarray(value)
    except Exception as exc:  # arbitrary unpickled objects
        raise CamFileError(f"{path}: {what} is not an array ({type(value).__name__}: {exc})") from None
    return arr


def _check_maps_dtype(arr: np.ndarray, path: Path, what: str, ndim: int) -> None:
    shape = "[n, H, W]" if ndim == 3 else "[H, W]"
    numeric = np.issubdtype(arr.dtype, np.floating) or (
        np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.bool_)
    if arr.ndim != ndim or not numeric:
        raise CamFileError(f"{path}: {what} must be a numeric array {shape}, got "
                           f"{arr.dtype} {tuple(arr.shape)}")


def _check_keys(keys: np.ndarray, path: Path, num_classes: int) -> np.ndarray:
    if keys.ndim != 1 or not np.issubdtype(keys.dtype, np.integer) or keys.dtype == np.bool_:
        raise CamFileError(f"{path}: class keys must be a 1-D integer array, got "
                           f"{keys.dtype} {tuple(keys.shape)}")
    keys = keys.astype(np.int64)
    if len(np.unique(keys)) != len(keys):
        raise CamFileError(f"{path}: duplicate class ids {keys.tolist()}")
    if keys.size and (keys.min() < 0 or keys.max() >= num_classes):
        raise CamFileError(f"{path}: class ids {keys.tolist()} outside 0..{num_classes - 1} "
                           f"(--num-classes {num_classes})")
    return keys


# --------------------------------------------------------------------------------------------
# Normalisation


def normalise_maps(maps: np.ndarray, path: Path, keys: np.ndarray,
                   normalize: bool = True) -> tuple[np.ndarray, int, int]:
    """Bring ``maps`` [n, H, W] into ``[0, 1]``; returns (maps, binarised count, renormalised count).

    ``{0, 255}`` maps (SC-CAM's binarised heat maps) are divided by 255; other maps already in
    ``[0, 1]`` (within rounding) are only clipped; the rest are clipped at 0 and divided by
    their max + 1e-5, or refused when ``normalize`` is false.
    """
    out = np.empty(maps.shape, np.float32)
    binarised = renormalised = 0
    for i, raw in enumerate(maps):
        m = raw.astype(np.float64)
        if not np.isfinite(m).all():
            raise CamFileError(f"{path}: map of class {int(keys[i])} contains NaN or Inf")
        if m.size and m.max() == BINARY_HIGH and np.all((m == 0) | (m == BINARY_HIGH)):
            # Lossless: the values carry one bit, so scaling is not a renormalisation.
            m = m / BINARY_HIGH
            binarised += 1
        lo, hi = (m.min(), m.max()) if m.size else (0.0, 0.0)
        if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
            if not normalize:
                raise CamFileError(f"{path}: map of class {int(keys[i])} has values in "
                                   f"[{lo:.3g}, {hi:.3g}], outside [0, 1] (--no-normalize)")
            m = np.clip(m, 0.0, None)
            m = m / (m.max() + NORM_EPS)
            renormalised += 1
        out[i] = np.clip(m, 0.0, 1.0)
    return out, binarised, renormalised


# --------------------------------------------------------------------------------------------
# Per-format readers


def _upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    if maps.shape[0] == 0:
        return np.zeros((0, *size), np.float32)
    # Same interpolation IRN uses to make its maps (bilinear, align_corners=False).
    t = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))[None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0].numpy()


def _read_irn(path: Path, trust_pickle: bool, num_classes: int,
              size: Optional[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray, bool, bool]:
    data = load_pickled_dict(path, trust_pickle)
    if "keys" not in data:
        raise CamFileError(f"{path}: IRN dict has no 'keys' (found {sorted(map(str, data))})")
    keys = _to_numpy(data["keys"], path, "'keys'")
    upsampled = False
    if data.get("high_res") is not None:
        maps = _to_numpy(data["high_res"], path, "'high_res'")
        _check_maps_dtype(maps, path, "'high_res'", 3)
    elif data.get("cam") is not None:
        maps = _to_numpy(data["cam"], path, "'cam'")
        _check_maps_dtype(maps, path, "'cam'", 3)
        if size is None:
            raise CamFileError(f"{path}: no 'high_res' maps, only stride-4 'cam' "
                               f"{tuple(maps.shape[1:])}; pass --size-from VOC_ROOT to upsample "
                               "them to the image size")
        maps = _upsample(maps, size)
        upsampled = True
    else:
        raise CamFileError(f"{path}: IRN dict has neither 'high_res' nor 'cam' "
                           f"(found {sorted(map(str, data))})")
    padded = False
    if (keys.ndim == 1 and np.issubdtype(keys.dtype, np.integer) and len(keys) == maps.shape[0] + 1
            and keys[0] == 0 and (keys[1:] >= 1).all()):
        # eval-time form np.pad(keys + 1, (1, 0)): background 0 first, classes 1-based.
        keys = keys[1:] - 1
        padded = True
    keys = _check_keys(keys, path, num_classes)
    if len(keys) != maps.shape[0]:
        raise CamFileError(f"{path}: {len(keys)} keys but {maps.shape[0]} maps")
    return keys, maps, padded, upsampled


def _read_class_dict(path: Path, trust_pickle: bool, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    data = load_pickled_dict(path, trust_pickle)
    if not data:
        raise CamFileError(f"{path}: dict holds no class maps")
    bad = [k for k in data if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer))]
    if bad:
        raise CamFileError(f"{path}: dict keys must be integer class ids (0-based), got {bad[0]!r}")
    keys = _check_keys(np.array([int(k) for k in data], np.int64), path, num_classes)
    maps = []
    for k in keys:
        m = _to_numpy(data[int(k)], path, f"map of class {k}")
        _check_maps_dtype(m, path, f"map of class {k}", 2)
        if maps and m.shape != maps[0].shape:
            raise CamFileError(f"{path}: map of class {k} is {m.shape}, others are {maps[0].shape}")
        maps.append(m)
    return keys, np.stack(maps)


def _read_dense(path: Path, num_classes: int, has_background: bool,
                labels: Optional[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    kind = _npy_kind(path)
    if kind != "plain":
        # npy-dir promises plain arrays, so a pickle here is malformed whatever --trust-pickle says.
        raise CamFileError(f"{path}: holds pickled data; npy-dir expects plain [C, H, W] arrays "
                           "(use --format irn/psa/sccam for pickled dicts)")
    arr = _load_plain(path)
    _check_maps_dtype(arr, path, "array", 3)
    expected = num_classes + int(has_background)
    if arr.shape[0] != expected:
        bg = " plus background" if has_background else ""
        raise CamFileError(f"{path}: {arr.shape[0]} channels, expected {expected} "
                           f"({num_classes} classes{bg}; see --num-classes, --has-background)")
    if has_background:
        arr = arr[1:]
    if not np.isfinite(arr).all():
        raise CamFileError(f"{path}: maps contain NaN or Inf")
    if labels is not None:
        keys = np.flatnonzero(labels).astype(np.int64)
    else:
        keys = np.flatnonzero(arr.reshape(arr.shape[0], -1).max(axis=1) > 0).astype(np.int64)
    return keys, arr[keys]


def convert_file(fmt: str, path: Path, *, trust_pickle: bool = False, num_classes: int = 20,
                 normalize: bool = True, size: Optional[tuple[int, int]] = None,
                 has_background: bool = False, labels: Optional[np.ndarray] = None) -> ConvertedCam:
    """Read one foreign CAM file and return it in our format (validated, in ``[0, 1]``).

    ``size`` is the image's (H, W): the maps are checked against it, and IRN's stride-4 maps
    are upsampled to it when ``high_res`` is missing.  ``labels`` (multi-hot ``[C]``) selects
    the classes of an ``npy-dir`` array.
    """
    path = Path(path)
    padded = upsampled = False
    if fmt == "irn":
        keys, maps, padded, upsampled = _read_irn(path, trust_pickle, num_classes, size)
    elif fmt in ("psa", "sccam"):
        keys, maps = _read_class_dict(path, trust_pickle, num_classes)
    elif fmt == "npy-dir":
        keys, maps = _read_dense(path, num_classes, has_background, labels)
    else:
        raise UserError(f"unknown CAM format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if size is not None and maps.shape[0] and tuple(maps.shape[1:]) != tuple(size):
        raise CamFileError(f"{path}: maps are {maps.shape[2]}x{maps.shape[1]} but the image is "
                           f"{size[1]}x{size[0]}")
    order = np.argsort(keys, kind="stable")
    keys, maps = keys[order], maps[order]
    cams, binarised, renormalised = normalise_maps(maps, path, keys, normalize)
    return ConvertedCam(keys, cams, binarised, renormalised, padded, upsampled)


# --------------------------------------------------------------------------------------------
# Side information from a VOC root or a labels file


def image_size(root: Path, image_id: str) -> tuple[int, int]:
    """(H, W) of ``ROOT/JPEGImages/<id>.jpg``, read from the header only."""
    from PIL import Image

    from .data.voc import DECODE_ERRORS, decode_error

    path = Path(root) / "JPEGImages" / f"{image_id}.jpg"
    if not path.is_file():
        raise DataError(f"{path}: image missing (needed for its size, --size-from)")
    try:
        with Image.open(path) as img:
            width, height = img.size
    except DECODE_ERRORS as exc:
        raise decode_error(path, exc, "image") from None
    return height, width


class _Labels:
    """Image-level labels from a ``cls_labels.json`` file or a VOC root (its JSON, else masks)."""

    def __init__(self, source: Path, num_classes: int) -> None:
        from .data.voc import MASK_DIRS, check_root, read_labels_file

        self.source = Path(source)
        self.num_classes = num_classes
        self.table: dict[str, np.ndarray] = {}
        self.mask_dir: Optional[Path] = None
        if self.source.is_dir():
            root = check_root(self.source)
            if (root / "cls_labels.json").is_file():
                self.table = read_labels_file(root / "cls_labels.json", num_classes)
            self.mask_dir = next((root / d for d in MASK_DIRS if (root / d).is_dir()), None)
        else:
            self.table = read_labels_file(self.source, num_classes)

    def get(self, image_id: str) -> np.ndarray:
        from .data.voc import read_mask

        if image_id in self.table:
            return self.table[image_id]
        mask_path = self.mask_dir / f"{image_id}.png" if self.mask_dir is not None else None
        if mask_path is None or not mask_path.is_file():
            raise DataError(f"{self.source}: no image-level labels for {image_id!r}")
        present = np.unique(read_mask(mask_path, self.num_classes))
        vec = np.zeros(self.num_classes, np.float32)
        vec[present[(present >= 1) & (present <= self.num_classes)].astype(np.int64) - 1] = 1.0
        return vec


# --------------------------------------------------------------------------------------------
# The folder conversion


def _missing_dirs(folder: Path) -> list[Path]:
    """``folder`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    for candidate in [folder, *folder.parents]:
        if candidate.exists():
            break
        missing.append(candidate)
    return missing


def import_cams(fmt: str, in_dir: Path, out_dir: Path, trust_pickle: bool = False, *,
                overwrite: bool = False, num_classes: int = 20, normalize: bool = True,
                size_from: Optional[Path] = None, has_background: bool = False,
                labels: Optional[Path] = None, skip_invalid: bool = False,
                progress: bool = False,
                warn: Optional[Callable[[str], None]] = None) -> ImportSummary:
    """Convert every ``<id>.npy`` of ``in_dir`` (format ``fmt``) into ``out_dir/<id>.npz``.

    ``fmt`` is one of :data:`FORMATS`.  Pickled inputs are refused unless ``trust_pickle``.
    Existing outputs are replaced only with ``overwrite``.  ``size_from`` is a VOC root whose
    images give the expected map sizes (and let IRN's stride-4 maps be upsampled);
    ``labels`` (``npy-dir`` only) is a ``cls_labels.json`` file or a VOC root.  A malformed
    input raises :class:`CamFileError` and nothing is written, unless ``skip_invalid``, which
    skips it and records why.  ``warn`` receives one-line warnings (default:
    :func:`warnings.warn`).
    """
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if fmt not in FORMATS:
        raise UserError(f"unknown CAM format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt != "npy-dir" and (has_background or labels is not None):
        raise UserError("--has-background and --labels only apply to --format npy-dir")
    if num_classes < 1:
        raise UserError(f"--num-classes must be at least 1, got {num_classes}")
    if not in_dir.is_dir():
        raise UserError(f"{in_dir}: input folder does not exist or is not a folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: output path exists and is not a folder")
    if warn is None:
        warn = lambda message: warnings.warn(message, UserWarning, stacklevel=3)  # noqa: E731

    summary = ImportSummary(fmt, in_dir, out_dir)
    inputs: list[Path] = []
    for entry in sorted(in_dir.iterdir()):
        if entry.is_file() and entry.suffix == ".npy" and not entry.name.startswith("."):
            inputs.append(entry)
        elif entry.is_file():
            summary.skipped.append((entry.name, "not a .npy file"))
    if not inputs:
        raise UserError(f"{in_dir}: no <id>.npy files to import")

    # Refuse clobbering before any work, so a long run never fails at the end on a conflict.
    targets = {p.stem: out_dir / f"{p.stem}.npz" for p in inputs}
    not_files = [t for t in targets.values() if t.exists() and not t.is_file()]
    if not_files:
        raise UserError(f"{not_files[0]}: output path exists and is not a file")
    existing = [t for t in targets.values() if t.exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise UserError(f"{existing[0]}: output file already exists{more}; pass --overwrite to "
                        "replace it")

    if size_from is not None:
        from .data.voc import check_root
        check_root(Path(size_from))
    label_table = _Labels(Path(labels), num_classes) if labels is not None else None

    from .progress import progress_bar

    created = _missing_dirs(out_dir)
    staging: Optional[Path] = None
    staged: dict[str, Path] = {}
    committed = False
    try:
        for path in progress_bar(inputs, f"import {fmt}", enabled=progress):
            image_id = path.stem
            try:
                size = image_size(Path(size_from), image_id) if size_from is not None else None
                converted = convert_file(
                    fmt, path, trust_pickle=trust_pickle, num_classes=num_classes,
                    normalize=normalize, size=size, has_background=has_background,
                    labels=label_table.get(image_id) if label_table is not None else None)
            except PickleRefusedError:
                raise
            except CamFileError as exc:
                if not skip_invalid:
                    raise
                summary.skipped.append((path.name, str(exc).removeprefix(f"{path}: ")))
                continue
            if staging is None:
                # Created lazily so a first-file refusal leaves no trace on disk.
                try:
                    out_dir.mkdir(parents=True, exist_ok=True)
                    staging = Path(tempfile.mkdtemp(prefix=".wsss-import-", dir=out_dir))
                except OSError as exc:
                    raise UserError(f"{out_dir}: cannot create output folder "
                                    f"({exc.strerror or exc})") from None
            staged[image_id] = staging / f"{image_id}.npz"
            write_cam(staged[image_id], converted.keys, converted.cams)
            summary.converted.append(image_id)
            if converted.binarised_maps:
                summary.binarised.append(image_id)
                summary.binarised_maps += converted.binarised_maps
            if converted.renormalised_maps:
                summary.renormalised.append(image_id)
                summary.renormalised_maps += converted.renormalised_maps
            if converted.padded_keys:
                summary.padded_keys.append(image_id)
            if converted.upsampled:
                summary.upsampled.append(image_id)

        if not summary.converted:
            names = {p.name for p in inputs}
            name, reason = next(s for s in summary.skipped if s[0] in names)
            raise CamFileError(f"{in_dir}: none of the {len(inputs)} input files could be "
                               f"converted (e.g. {name}: {reason})")
        for image_id, staged_path in staged.items():
            try:
                os.replace(staged_path, targets[image_id])
            except OSError as exc:
                raise UserError(f"{targets[image_id]}: cannot write output "
                                f"({exc.strerror or exc})") from None
        committed = True
    finally:
        if staging is not None:
            # Only our own staging folder (and files we put there) is ever removed.
            shutil.rmtree(staging, ignore_errors=True)
        if not committed:
            for folder in created:  # deepest first; rmdir only removes empty folders we made
                with contextlib.suppress(OSError):
                    folder.rmdir()

    if summary.binarised:
        warn(f"{len(summary.binarised)} of {len(summary.converted)} files hold maps binarised to "
             "{0, 255} (the SC-CAM heat-map bug): they are thresholded heat maps, not continuous "
             "CAMs; scaled 255 -> 1")
    return summary
