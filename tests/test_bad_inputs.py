"""A table-driven corpus of malformed inputs: every one must end in ONE clean error line.

Each case builds one bad input in ``tmp_path`` (a good tiny VOC tree plus exactly one defect),
runs the CLI in-process with click's ``CliRunner`` and checks that

1. the exit status is 2 (a user error, not a crash),
2. the whole output is one line starting with ``Error:`` (no traceback, no progress noise),
3. that line names the offending input (file name, key or value),
4. nothing partial was written: no ``results.json`` and no temporary ``*.tmp`` file anywhere
   under ``tmp_path`` (plus case-specific outputs that must not exist), and no file under it is
   left open (a leaked handle adds a ``warning: unclosed file`` line at exit).

"Control" cases are good inputs next to the bad ones (extra labelled ids, a PNG named .jpg,
palette masks, K larger than a class's images...): they must work, which also proves that the
bad cases fail because of their one defect.  Nothing here trains a model: commands stop before
training (``--dry-run``, ``eval``, ``data check``, ``cams`` on a tiny checkpoint, ``cluster``,
``convert-weights``, ``import``).  Cases that do not (yet) behave as required are marked
``xfail(strict=True)`` with what is wrong.
"""
from __future__ import annotations

import functools
import json
import os
import struct
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from PIL import Image

from tests.conftest import write_voc_tree
from wsss_bench.cli.main import cli
from wsss_bench.evaluation.camfiles import write_cam

IDS = [f"img_{i:03d}" for i in range(8)]
SPLITS = {"train_aug": IDS[:6], "train": IDS[:3], "val": IDS[6:]}
SIZE = (40, 32)  # (W, H) of every image of the tree
W, H = SIZE
NUM_CLASSES = 3
BAD = "img_001"  # the id whose file is broken in single-file cases (it is in train and train_aug)
WIDTH = 0.0625

TINY_CAMS = ["--backbone", "resnet38d", "--set", f"backbone.options={{width: {WIDTH}}}",
             "--set", "cams.scales=[1.0]", "--set", "cams.flip=false", "--quiet", "--device", "cpu"]


# -- result checks -------------------------------------------------------------------------------
def invoke(args: Sequence[object]) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def open_files_under(folder: Path) -> list[str]:
    """Files under ``folder`` this process still holds open (Linux ``/proc``; else none known).

    A handle left open by a failed command is closed by the garbage collector or at exit, and a
    real ``wsss`` process then prints ``warning: unclosed file ...`` after its error line.
    """
    fd_dir = Path("/proc/self/fd")
    if not fd_dir.is_dir():
        return []
    found = []
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(fd_dir / fd)
        except OSError:
            continue
        if target.startswith(str(folder)):
            found.append(target)
    return sorted(found)


def describe(result: Result) -> str:
    text = f"exit code {result.exit_code}; output:\n{result.output}"
    if result.exc_info is not None and not isinstance(result.exception, SystemExit):
        text += "\n" + "".join(traceback.format_exception(*result.exc_info))
    return text


def leftovers(tmp: Path) -> list[Path]:
    """Files that must never survive a failed command: results and temporary files."""
    return sorted(p for p in tmp.rglob("*")
                  if p.name in ("results.json", "results.md") or p.name.endswith(".tmp"))


def assert_user_error(result: Result, needles: Sequence[str], tmp: Path,
                      absent: Sequence[Path] = ()) -> None:
    info = describe(result)
    assert result.exit_code == 2, info
    assert "Traceback" not in result.output, info
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got {len(lines)}; {info}"
    assert lines[0].startswith("Error: "), info
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not named; {info}"
    leaked = open_files_under(tmp)
    assert not leaked, (f"file handles left open (printed as 'warning: unclosed file' after the "
                        f"error at exit): {leaked}; {info}")
    assert leftovers(tmp) == [], f"partial output {leftovers(tmp)}; {info}"
    for path in absent:
        assert not path.exists(), f"{path} was written; {info}"


def assert_ok(result: Result) -> None:
    assert result.exit_code == 0, describe(result)
    assert "Error" not in result.output and "Traceback" not in result.output, describe(result)


# -- good inputs that cases spoil ----------------------------------------------------------------
def tree(tmp: Path, **kwargs: object) -> Path:
    """The good tiny VOC tree (6 train_aug, 3 train, 2 val images of 40x32, 3 classes)."""
    return write_voc_tree(tmp / "voc", SPLITS, num_classes=NUM_CLASSES, size=SIZE, **kwargs)


def good_cams(tmp: Path, ids: Sequence[str] = SPLITS["train"]) -> Path:
    """Valid CAM files (class 0, a ramp in [0, 1]) for ``ids``."""
    folder = tmp / "cams"
    w, h = SIZE
    ramp = np.linspace(0, 1, h * w, dtype=np.float32).reshape(1, h, w)
    for image_id in ids:
        write_cam(folder / f"{image_id}.npz", np.array([0]), ramp)
    return folder


def eval_args(tmp: Path, root: Path, cams: Path | None = None, split: str = "train") -> list[object]:
    cams = cams if cams is not None else good_cams(tmp)
    return ["eval", "--cams", cams, "--data-root", root, "--split", split, "--device", "cpu",
            "--out", tmp / "out"]


def split_file(root: Path, split: str = "train") -> Path:
    return root / "ImageSets" / "Segmentation" / f"{split}.txt"


def real_jpeg_bytes() -> bytes:
    """A real, larger JPEG (so that half of it is clearly truncated image data)."""
    import io

    rng = np.random.default_rng(1)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (SIZE[1], SIZE[0], 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


@functools.cache
def _model_state(width: float, classes: int) -> dict[str, torch.Tensor]:
    from wsss_bench import create_backbone
    from wsss_bench.engine.model import Classifier

    torch.manual_seed(0)
    backbone = create_backbone("resnet38d", width=width, freeze_bn=False, freeze_stem=False)
    return {k: v.detach().clone() for k, v in Classifier(backbone, classes).state_dict().items()}


def model_state(width: float = WIDTH, classes: int = NUM_CLASSES) -> dict[str, torch.Tensor]:
    """A fresh copy of a tiny classifier's state dict (our internal key names)."""
    return dict(_model_state(width, classes))


def cams_args(tmp: Path, root: Path, weights: Path) -> list[object]:
    return ["cams", "--weights", weights, "--data-root", root, "--out", tmp / "out",
            "--split", "val", *TINY_CAMS]


class CustomPayload:
    """A user class: unpickling it needs arbitrary imports, which weights_only refuses."""

    def __init__(self) -> None:
        self.note = "not a tensor"


class ExecOnLoad:
    """A pickle whose loading calls ``os.makedirs(marker)``: proof that code would run."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def mx_header(n: int) -> bytes:
    return struct.pack("<QQQ", 0x112, 0, n)


def mx_names(names: Sequence[str]) -> bytes:
    out = struct.pack("<Q", len(names))
    for name in names:
        out += struct.pack("<Q", len(name.encode())) + name.encode()
    return out


def mx_v2_record(arr: np.ndarray) -> bytes:
    shape = struct.pack("<i", arr.ndim) + b"".join(struct.pack("<q", d) for d in arr.shape)
    return (struct.pack("<I", 0xF993FAC9) + struct.pack("<i", 0) + shape
            + struct.pack("<iii", 1, 0, 0) + arr.astype("<f4").tobytes())


def convert_args(tmp: Path, src: Path) -> list[object]:
    return ["convert-weights", src, tmp / "out" / "converted.pth", "--width", WIDTH]


def good_features(rows: int = len(SPLITS["train_aug"]), dims: int = 8) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(rows, dims)).astype(np.float32)


def cluster_args(tmp: Path, root: Path, features: Path, *extra: object, k: int = 2) -> list[object]:
    return ["cluster", "--out", tmp / "out", "--features", features, "--data-root", root,
            "--k", k, "--quiet", "--device", "cpu", *extra]


# -- the corpus ----------------------------------------------------------------------------------
@dataclass
class Case:
    """One malformed input: the command line, what the error must name, what must not exist."""

    args: list[object]
    needles: list[str]
    absent: list[Path] = field(default_factory=list)
    #: Text the error line must not hold (e.g. torch's advice to load with weights_only=False).
    forbidden: list[str] = field(default_factory=list)


Builder = Callable[[Path], Case]
CASES: list = []


def case(name: str, xfail: str | None = None) -> Callable[[Builder], Builder]:
    def add(builder: Builder) -> Builder:
        marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
        CASES.append(pytest.param(builder, id=name, marks=marks))
        return builder
    return add


# split lists -------------------------------------------------------------------------------------
@case("split-missing-file")
def _(tmp: Path) -> Case:
    root = tree(tmp)
    return Case(eval_args(tmp, root, split="nosuchsplit"), ["nosuchsplit.txt", "not found"])


@case("split-name-traversal")
def _(tmp: Path) -> Case:
    root = tree(tmp)
    return Case(eval_args(tmp, root, split="../../train"), ["'../../train'"])


@case("split-empty")
def _(tmp: Path) -> Case:
    root = tree(tmp)
    split_file(root).write_text("\n# only a comment\n\n")
    return Case(eval_args(tmp, root), ["train.txt", "empty"])


@case("split-duplicate-id")
def _(tmp: Path) -> Case:
    root = tree(tmp)
    split_file(root).write_text("img_000\nimg_001\nimg_002\nimg_001\n")
    return Case(eval_args(tmp, root), ["train.txt:4", "'img_001'", "duplicate"])


@case("split-id-with-slash")
def _(tmp: Path) -> Case:
    root = tree(tmp)
    split_file(root).write_text("img_000\nsub/img_001\n")
    return Case(eval_args(tmp, root), ["train.txt:2", "sub/img_001"])


@case("split-id-dotdot")
def _(tmp: Path) -> Case:
    root = tree(tmp)
    split_file(root).write_text("img_000\n..\n")
    return Case(eval_args(tmp, root), ["train.txt:2", "'..'"])


@case("split-id-parent-traversal")
def _(tmp: Path) -> Case:
    root = tree(tmp)
    (tmp / "secret.jpg").write_bytes(real_jpeg_bytes())
    split_file(root).write_text("img_000\n../secret\n")
    return Case(eval_args(tmp, root), ["train.txt:2", "../secret"])


@case("split-psa-line-outside-jpegimages")
def _(tmp: Path) -> Case:
    root = tree(tmp)
    split_file(root).write_text("/JPEGImages/img_000.jpg /SegmentationClassAug/img_000.png\n"
                                "/JPEGImages/../../secret.jpg /SegmentationClassAug/img_001.png\n")
    return Case(eval_args(tmp, root), ["train.txt:2", "/JPEGImages/../../secret.jpg"])


@case("split-psa-line-other-folder")
def _(tmp: Path) -> Case:
    root = tree(tmp)
    split_file(root).write_text("/SegmentationClassAug/img_000.png /JPEGImages/img_000.jpg\n")
    return Case(eval_args(tmp, root), ["train.txt:1", "/SegmentationClassAug/img_000.png"])


# the file system's limits ---------------------------------------------------------------------
LONG_ID = "x" * 300  # over every common file-name limit (255 bytes) with or without a suffix


@case("split-id-longer-than-name-limit-eval")
def _(tmp: Path) -> Case:
    root = tree(tmp)
    split_file(root).write_text(f"img_000\n{LONG_ID}\n")
    return Case(eval_args(tmp, root), ["train.txt:2", "name limit"])


@case("split-id-longer-than-name-limit-data-check")
def _(tmp: Path) -> Case:
    root = tree(tmp)
    split_file(root, "val").write_text(f"img_006\n{LONG_ID}\n")
    return Case(["data", "check", "--data-root", root, "--split", "val"], ["val.txt:2", "name limit"])


@case("split-id-longer-than-name-limit-run")
def _(tmp: Path) -> Case:
    root = tree(tmp)
    split_file(root, "train_aug").write_text(f"img_000\n{LONG_ID}\n")
    return Case(["train", "--data-root", root, "--out", tmp / "out", *TINY_CAMS],
                ["train_aug.txt:2", "name limit"], absent=[tmp / "out" / "checkpoints"])


@functools.cache
def decompression_bomb_png() -> bytes:
    """A real PNG of 14000 x 14000 zeros (190 kB): above PIL's decoding limit of 2 x 89.5 M pixels."""
    import io

    buffer = io.BytesIO()
    Image.new("L", (14000, 14000)).save(buffer, "PNG")
    return buffer.getvalue()


@case("image-decompression-bomb")
def _(tmp: Path) -> Case:
    root = tree(tmp)
    (root / "JPEGImages" / f"{BAD}.jpg").write_bytes(decompression_bomb_png())
    return Case(["data", "check", "--data-root", root, "--split", "train"],
                [f"{BAD}.jpg", "too large to decode safely"])


@case("image-decompression-bomb-eval")
def _(tmp: Path) -> Case:
    root = tree(tmp)
    (root / "JPEGImages" / f"{BAD}.jpg").write_bytes(decompression_bomb_png())
    return Case(eval_args(tmp, root), [f"{BAD}.jpg", "too large to decode safely"])


@case("split-listed-image-missing")
def _(tmp: Path) -> Case:
    root = tree(tmp)
    (root / "JPEGImages" / f"{BAD}.jpg").unlink()
    return Case(eval_args(tmp, root), [f"{BAD}.jpg", "missing"])


# images (`wsss data check` decodes every image) --------------------------------------------------
def data_check(root: Path, split: str = "train") -> list[object]:
    return ["data", "check", "--data-root", root, "--split", split]


@case("image-corrupt-jpeg")
def _(tmp: Path) -> Case:
    root = tree(tmp)
    (root / "JPEGImages" / f"{BAD}.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg at all")
    return Case(data_check(root), [f"{BAD}.jpg"])


@case("image-truncated-jpeg")
def _(tmp: Path) -> Case:
    root = tree(tmp)
    data = real_jpeg_bytes()
    (root / "JPEGImages" / f"{BAD}.jpg").write_bytes(data[: len(data) // 2])
    return Case(data_check(root), [f"{BAD}.jpg"])


@case("image-zero-bytes")
def _(tmp: Path) -> Case:
    root = tree(tmp)
    (root / "JPEGImages" / f"{BAD}.jpg").write_bytes(b"")
    return Case(data_check(root), [f"{BAD}.jpg"])


@case("image-truncated-in-run-before-training")
def _(tmp: Path) -> Case:
    root = tree(tmp)
    data = real_jpeg_bytes()
    (root / "JPEGImages" / f"{BAD}.jpg").write_bytes(data[: len(data) // 2])
    # `wsss train` must stop on the broken image before any training step.
    return Case(["train", "--data-root", root, "--out", tmp / "out", *TINY_CAMS,
                 "--set", "train.epochs=1", "--set", "train.crop_size=16",
                 "--set", "train.resize_long=[16,16]", "--set", "train.batch_size=6"],
                [f"{BAD}.jpg"], absent=[tmp / "out" / "checkpoints"])


# masks -----------------------------------------------------------------------------------------
def mask_path(root: Path, image_id: str = BAD) -> Path:
    return root / "SegmentationClassAug" / f"{image_id}.png"


@case("mask-truncated-png")
def _(tmp: Path) -> Case:
    root = tree(tmp)
    data = mask_path(root).read_bytes()
    mask_path(root).write_bytes(data[: len(data) // 2])
    return Case(eval_args(tmp, root), [f"{BAD}.png"])


@case("mask-values-outside-classes")
def _(tmp: Path) -> Case:
    root = tree(tmp)
    mask = np.zeros((SIZE[1], SIZE[0]), np.uint8)
    mask[5:10, 5:10] = 7  # 3 classes: valid values are 0..3 and 255
    Image.fromarray(mask, mode="L").save(mask_path(root))
    return Case(eval_args(tmp, root), [f"{BAD}.png", "[7]"])


@case("mask-wrong-size-data-check")
def _(tmp: Path) -> Case:
    root = tree(tmp)
    Image.fromarray(np.zeros((16, 20), np.uint8), mode="L").save(mask_path(root))
    return Case(data_check(root), [f"{BAD}.png", "20x16"])


@case("mask-wrong-size-eval")
def _(tmp: Path) -> Case:
    root = tree(tmp)
    Image.fromarray(np.zeros((16, 20), np.uint8), mode="L").save(mask_path(root))
    return Case(eval_args(tmp, root), [f"{BAD}.png"])


@case("mask-rgb")
def _(tmp: Path) -> Case:
    root = tree(tmp)
    Image.fromarray(np.zeros((SIZE[1], SIZE[0], 3), np.uint8), mode="RGB").save(mask_path(root))
    return Case(eval_args(tmp, root), [f"{BAD}.png", "RGB"])


@case("mask-16bit-large-values")
def _(tmp: Path) -> Case:
    root = tree(tmp)
    mask = np.zeros((SIZE[1], SIZE[0]), np.uint16)
    mask[5:10, 5:10] = 1000
    mask[0, :] = 255
    Image.fromarray(mask).save(mask_path(root))
    return Case(eval_args(tmp, root), [f"{BAD}.png", "1000"])


@case("mask-missing-for-listed-image")
def _(tmp: Path) -> Case:
    root = tree(tmp)
    mask_path(root).unlink()
    (root / "cls_labels.json").write_text(json.dumps({i: [0] for i in IDS}))
    return Case(eval_args(tmp, root), [f"{BAD}.png"])


# image-level labels -------------------------------------------------------------------------------
@case("labels-invalid-json")
def _(tmp: Path) -> Case:
    root = tree(tmp)
    (root / "cls_labels.json").write_text('{"img_000": [0], "img_001": [1,')
    return Case(eval_args(tmp, root), ["cls_labels.json", "invalid JSON"])


@case("labels-class-out-of-range")
def _(tmp: Path) -> Case:
    root = tree(tmp)
    (root / "cls_labels.json").write_text(json.dumps({"img_000": [0], BAD: [0, 7]}))
    return Case(eval_args(tmp, root), ["cls_labels.json", f"'{BAD}'", "[0, 7]"])


@case("labels-not-a-list")
def _(tmp: Path) -> Case:
    root = tree(tmp)
    (root / "cls_labels.json").write_text(json.dumps({"img_000": [0], BAD: 1}))
    return Case(eval_args(tmp, root), ["cls_labels.json", f"'{BAD}'"])


@case("labels-top-level-list")
def _(tmp: Path) -> Case:
    root = tree(tmp)
    (root / "cls_labels.json").write_text(json.dumps([[0], [1]]))
    return Case(eval_args(tmp, root), ["cls_labels.json", "object"])


@case("labels-float-class-id")
def _(tmp: Path) -> Case:
    root = tree(tmp)
    (root / "cls_labels.json").write_text(json.dumps({"img_000": [0], BAD: [1.5]}))
    return Case(eval_args(tmp, root), ["cls_labels.json", f"'{BAD}'"])


@case("labels-file-given-but-missing")
def _(tmp: Path) -> Case:
    root = tree(tmp)
    return Case([*eval_args(tmp, root), "--labels", tmp / "nolabels.json"], ["nolabels.json", "not found"])


# configuration (`wsss run --dry-run` validates everything and runs nothing) ---------------------------
def dry(tmp: Path, *extra: object) -> list[object]:
    return ["run", "--dry-run", "--out", tmp / "out", *extra]


@case("config-unknown-key")
def _(tmp: Path) -> Case:
    return Case(dry(tmp, "--set", "train.bogus_key=1"), ["bogus_key"])


@case("config-unknown-top-level-key-in-file")
def _(tmp: Path) -> Case:
    (tmp / "c.yaml").write_text("trian:\n  epochs: 2\n")
    return Case(dry(tmp, "--config", tmp / "c.yaml"), ["trian"])


@case("config-wrong-type")
def _(tmp: Path) -> Case:
    return Case(dry(tmp, "--set", "train.epochs=lots"), ["train.epochs"])


@case("config-epochs-zero")
def _(tmp: Path) -> Case:
    return Case(dry(tmp, "--set", "train.epochs=0"), ["train.epochs"])


@case("config-threshold-2")
def _(tmp: Path) -> Case:
    return Case(dry(tmp, "--set", "eval.threshold=2"), ["eval.threshold"])


@case("config-set-without-equals")
def _(tmp: Path) -> Case:
    return Case(dry(tmp, "--set", "train.epochs"), ["train.epochs", "KEY=VALUE"])


@case("config-invalid-yaml")
def _(tmp: Path) -> Case:
    (tmp / "broken.yaml").write_text("train: {epochs: [1,\n")
    return Case(dry(tmp, "--config", tmp / "broken.yaml"), ["broken.yaml", "invalid YAML"])


@case("config-not-a-mapping")
def _(tmp: Path) -> Case:
    (tmp / "list.yaml").write_text("- train\n- epochs\n")
    return Case(dry(tmp, "--config", tmp / "list.yaml"), ["list.yaml", "mapping"])


@case("config-file-missing")
def _(tmp: Path) -> Case:
    return Case(dry(tmp, "--config", tmp / "absent.yaml"), ["absent.yaml", "not found"])


@case("config-unknown-preset")
def _(tmp: Path) -> Case:
    return Case(dry(tmp, "--preset", "turbo"), ["'turbo'"])


@case("config-backbone-option-out-of-range")
def _(tmp: Path) -> Case:
    return Case(dry(tmp, "--set", "backbone.options.width=-1"), ["width"])


@case("config-method-option-unknown")
def _(tmp: Path) -> Case:
    return Case(dry(tmp, "--method", "subcat", "--set", "method.options.kk=3"), ["kk"])


@case("plugin-unknown-method")
def _(tmp: Path) -> Case:
    return Case(dry(tmp, "--method", "nosuchmethod"), ["'nosuchmethod'"])


@case("plugin-unknown-backbone")
def _(tmp: Path) -> Case:
    return Case(dry(tmp, "--backbone", "nosuchbackbone"), ["'nosuchbackbone'"])


@case("plugin-unknown-dataset")
def _(tmp: Path) -> Case:
    return Case(dry(tmp, "--dataset", "nosuchdataset"), ["'nosuchdataset'"])


@case("plugin-unknown-clusterer-dry-run")
def _(tmp: Path) -> Case:
    return Case(dry(tmp, "--method", "subcat", "--set", "method.options.clusterer.name=nope"),
                ["'nope'"])


@case("plugin-unknown-clusterer-run")
def _(tmp: Path) -> Case:
    root = tree(tmp)
    return Case(["run", "--method", "subcat", "--data-root", root, "--out", tmp / "out", *TINY_CAMS,
                 "--set", "method.options={rounds: 1, k: 2, clusterer: {name: nope}}",
                 "--set", "train.epochs=1", "--set", "train.crop_size=16",
                 "--set", "train.resize_long=[16,16]"],
                ["'nope'"], absent=[tmp / "out" / "checkpoints"])


@case("plugin-unknown-clusterer-cluster-step")
def _(tmp: Path) -> Case:
    root = tree(tmp)
    np.save(tmp / "feats.npy", good_features())
    return Case(cluster_args(tmp, root, tmp / "feats.npy", "--clusterer", "nope"), ["'nope'"],
                absent=[tmp / "out" / "subcategories"])


@case("device-tpu")
def _(tmp: Path) -> Case:
    return Case(["run", "--device", "tpu", "--preset", "smoke", "--out", tmp / "out"], ["'tpu'"],
                absent=[tmp / "out"])


@case("device-tpu-dry-run")
def _(tmp: Path) -> Case:
    return Case(dry(tmp, "--device", "tpu"), ["'tpu'"])


# CAM files for `wsss eval` ---------------------------------------------------------------------------
def spoil_cam(tmp: Path, write: Callable[[Path], None]) -> Path:
    cams = good_cams(tmp)
    write(cams / f"{BAD}.npz")
    return cams


def npz(path: Path, **arrays: np.ndarray) -> None:
    with open(path, "wb") as handle:  # np.savez on a path would append .npz to other names
        np.savez(handle, **arrays)



@case("cam-wrong-keys")
def _(tmp: Path) -> Case:
    cams = spoil_cam(tmp, lambda p: npz(p, labels=np.array([0]), maps=np.zeros((1, H, W), np.float32)))
    return Case(eval_args(tmp, tree(tmp), cams), [f"{BAD}.npz", "keys"])


@case("cam-wrong-shape")
def _(tmp: Path) -> Case:
    cams = spoil_cam(tmp, lambda p: npz(p, keys=np.array([0]), cams=np.zeros((1, 5, 5), np.float32)))
    return Case(eval_args(tmp, tree(tmp), cams), [f"{BAD}.npz", "5x5"])


@case("cam-2d-maps")
def _(tmp: Path) -> Case:
    cams = spoil_cam(tmp, lambda p: npz(p, keys=np.array([0]), cams=np.zeros((H, W), np.float32)))
    return Case(eval_args(tmp, tree(tmp), cams), [f"{BAD}.npz", "'cams'"])


@case("cam-keys-maps-count-mismatch")
def _(tmp: Path) -> Case:
    cams = spoil_cam(tmp, lambda p: npz(p, keys=np.array([0, 1]), cams=np.zeros((1, H, W), np.float32)))
    return Case(eval_args(tmp, tree(tmp), cams), [f"{BAD}.npz", "2 keys"])


@case("cam-integer-maps")
def _(tmp: Path) -> Case:
    cams = spoil_cam(tmp, lambda p: npz(p, keys=np.array([0]), cams=np.ones((1, H, W), np.int64)))
    return Case(eval_args(tmp, tree(tmp), cams), [f"{BAD}.npz", "float"])


@case("cam-float-keys")
def _(tmp: Path) -> Case:
    cams = spoil_cam(tmp, lambda p: npz(p, keys=np.array([0.0]), cams=np.zeros((1, H, W), np.float32)))
    return Case(eval_args(tmp, tree(tmp), cams), [f"{BAD}.npz", "'keys'"])


@case("cam-nan")
def _(tmp: Path) -> Case:
    maps = np.zeros((1, H, W), np.float32)
    maps[0, 3, 3] = np.nan
    cams = spoil_cam(tmp, lambda p: npz(p, keys=np.array([0]), cams=maps))
    return Case(eval_args(tmp, tree(tmp), cams), [f"{BAD}.npz", "NaN"])


@case("cam-values-above-one")
def _(tmp: Path) -> Case:
    cams = spoil_cam(tmp, lambda p: npz(p, keys=np.array([0]), cams=np.full((1, H, W), 3.5, np.float32)))
    return Case(eval_args(tmp, tree(tmp), cams), [f"{BAD}.npz", "3.5"])


@case("cam-class-id-out-of-range")
def _(tmp: Path) -> Case:
    cams = spoil_cam(tmp, lambda p: npz(p, keys=np.array([5]), cams=np.zeros((1, H, W), np.float32)))
    return Case(eval_args(tmp, tree(tmp), cams), [f"{BAD}.npz", "[5]"])


@case("cam-negative-class-id")
def _(tmp: Path) -> Case:
    cams = spoil_cam(tmp, lambda p: npz(p, keys=np.array([-1]), cams=np.zeros((1, H, W), np.float32)))
    return Case(eval_args(tmp, tree(tmp), cams), [f"{BAD}.npz", "[-1]"])


@case("cam-pickled-object-array-npz")
def _(tmp: Path) -> Case:
    marker = tmp / "pickle-ran"
    payload = np.empty(1, dtype=object)
    payload[0] = ExecOnLoad(str(marker))
    cams = spoil_cam(tmp, lambda p: npz(p, keys=np.array([0]), cams=payload))
    return Case(eval_args(tmp, tree(tmp), cams), [f"{BAD}.npz", "pickle"], absent=[marker])


@case("cam-pickled-npy-renamed-npz")
def _(tmp: Path) -> Case:
    marker = tmp / "pickle-ran"

    def write(path: Path) -> None:
        with open(path, "wb") as handle:
            np.save(handle, np.array([ExecOnLoad(str(marker))], dtype=object), allow_pickle=True)
    cams = spoil_cam(tmp, write)
    return Case(eval_args(tmp, tree(tmp), cams), [f"{BAD}.npz", "pickle"], absent=[marker])


@case("cam-plain-npy-under-npz-name")
def _(tmp: Path) -> Case:
    def write(path: Path) -> None:
        with open(path, "wb") as handle:
            np.save(handle, np.zeros((1, H, W), np.float32))
    return Case(eval_args(tmp, tree(tmp), spoil_cam(tmp, write)), [f"{BAD}.npz", ".npy array"])


@case("cam-garbage-bytes")
def _(tmp: Path) -> Case:
    cams = spoil_cam(tmp, lambda p: p.write_bytes(b"PK\x03\x04 definitely not a zip archive"))
    return Case(eval_args(tmp, tree(tmp), cams), [f"{BAD}.npz"])


@case("cam-zero-bytes")
def _(tmp: Path) -> Case:
    cams = spoil_cam(tmp, lambda p: p.write_bytes(b""))
    return Case(eval_args(tmp, tree(tmp), cams), [f"{BAD}.npz"])


@case("cam-missing-file-for-an-id")
def _(tmp: Path) -> Case:
    cams = spoil_cam(tmp, lambda p: p.unlink())
    return Case(eval_args(tmp, tree(tmp), cams), [f"{BAD}.npz", "no CAM file"])


@case("cam-folder-missing")
def _(tmp: Path) -> Case:
    return Case(eval_args(tmp, tree(tmp), tmp / "nocams"), ["nocams", "not found"])


@case("eval-threshold-out-of-range")
def _(tmp: Path) -> Case:
    return Case([*eval_args(tmp, tree(tmp)), "--threshold", "2"], ["--threshold", "2"])


# checkpoints for `wsss cams --weights` -----------------------------------------------------------------
@case("ckpt-missing-file")
def _(tmp: Path) -> Case:
    return Case(cams_args(tmp, tree(tmp), tmp / "missing.pth"), ["missing.pth", "not found"],
                absent=[tmp / "out" / "cams"])


@case("ckpt-garbage-bytes")
def _(tmp: Path) -> Case:
    (tmp / "garbage.pth").write_bytes(os.urandom(4096))
    return Case(cams_args(tmp, tree(tmp), tmp / "garbage.pth"), ["garbage.pth"],
                absent=[tmp / "out" / "cams"])


@case("ckpt-truncated")
def _(tmp: Path) -> Case:
    torch.save(model_state(), tmp / "full.pth")
    data = (tmp / "full.pth").read_bytes()
    (tmp / "half.pth").write_bytes(data[: len(data) // 2])
    return Case(cams_args(tmp, tree(tmp), tmp / "half.pth"), ["half.pth"], absent=[tmp / "out" / "cams"])


@case("ckpt-missing-keys")
def _(tmp: Path) -> Case:
    state = model_state()
    del state["backbone.conv1a.weight"]
    torch.save(state, tmp / "ckpt.pth")
    return Case(cams_args(tmp, tree(tmp), tmp / "ckpt.pth"), ["ckpt.pth", "backbone.conv1a.weight"],
                absent=[tmp / "out" / "cams"])


@case("ckpt-extra-keys")
def _(tmp: Path) -> Case:
    state = model_state()
    state["backbone.bogus_layer.weight"] = torch.zeros(3)
    torch.save(state, tmp / "ckpt.pth")
    return Case(cams_args(tmp, tree(tmp), tmp / "ckpt.pth"), ["ckpt.pth", "bogus_layer"],
                absent=[tmp / "out" / "cams"])


@case("ckpt-head-with-other-class-count")
def _(tmp: Path) -> Case:
    torch.save(model_state(classes=20), tmp / "voc20.pth")
    return Case(cams_args(tmp, tree(tmp), tmp / "voc20.pth"), ["voc20.pth", "20 classes"],
                absent=[tmp / "out" / "cams"])


@case("ckpt-backbone-unrecognised")
def _(tmp: Path) -> Case:
    # Another width now loads (the architecture is read off the file); a trunk no backbone
    # plugin recognises (here: ResNet-38 without its last BN) is named by the strict load.
    state = {k: v for k, v in model_state(width=0.125).items() if not k.startswith("backbone.bn7.")}
    torch.save(state, tmp / "odd.pth")
    return Case(cams_args(tmp, tree(tmp), tmp / "odd.pth"), ["odd.pth", "missing"],
                absent=[tmp / "out" / "cams"])


@case("ckpt-not-tensors")
def _(tmp: Path) -> Case:
    torch.save({"state_dict": {"backbone.conv1a.weight": [1, 2, 3]}}, tmp / "lists.pth")
    return Case(cams_args(tmp, tree(tmp), tmp / "lists.pth"), ["lists.pth", "tensors"],
                absent=[tmp / "out" / "cams"])


@case("ckpt-checksum-mismatch")
def _(tmp: Path) -> Case:
    from wsss_bench import create_backbone
    from wsss_bench.checkpoints import save_checkpoint
    from wsss_bench.engine.model import Classifier

    model = Classifier(create_backbone("resnet38d", width=WIDTH), NUM_CLASSES)
    save_checkpoint(tmp / "ours.pth", model, {"tag": "round0"})
    payload = torch.load(tmp / "ours.pth", weights_only=True)
    payload["state_dict"]["heads.parent.weight"] += 1.0  # bit rot after saving
    torch.save(payload, tmp / "ours.pth")
    return Case(cams_args(tmp, tree(tmp), tmp / "ours.pth"), ["ours.pth", "checksum"],
                absent=[tmp / "out" / "cams"])


@case("ckpt-pickled-custom-class")
def _(tmp: Path) -> Case:
    state = model_state()
    torch.save({"state_dict": state, "extra": CustomPayload()}, tmp / "custom.pth")
    return Case(cams_args(tmp, tree(tmp), tmp / "custom.pth"), ["custom.pth"],
                absent=[tmp / "out" / "cams"])


@case("ckpt-pickled-custom-class-names-the-class")
def _(tmp: Path) -> Case:
    torch.save({"state_dict": model_state(), "extra": CustomPayload()}, tmp / "custom.pth")
    return Case(cams_args(tmp, tree(tmp), tmp / "custom.pth"), ["custom.pth", "CustomPayload"],
                absent=[tmp / "out" / "cams"])


@case("ckpt-pickle-that-runs-code")
def _(tmp: Path) -> Case:
    marker = tmp / "pickle-ran"
    state = model_state()
    state["payload"] = ExecOnLoad(str(marker))  # type: ignore[assignment]
    torch.save(state, tmp / "evil.pth")
    return Case(cams_args(tmp, tree(tmp), tmp / "evil.pth"), ["evil.pth"],
                absent=[marker, tmp / "out" / "cams"])


# MXNet .params for `wsss convert-weights` ----------------------------------------------------------------
def _one_tensor_params() -> bytes:
    arr = np.arange(2 * 3 * 3 * 3, dtype=np.float32).reshape(2, 3, 3, 3)
    return mx_header(1) + mx_v2_record(arr) + mx_names(["arg:conv1a_weight"])


@case("mxnet-garbage-as-init-weights")
def _(tmp: Path) -> Case:
    # Bytes that torch reads as a pickle and refuses: its message advises weights_only=False.
    (tmp / "garbage.params").write_bytes(b"\x80\x02" + np.random.default_rng(0).bytes(3000))
    return Case(["train", "--data-root", tree(tmp), "--out", tmp / "out", *TINY_CAMS,
                 "--init-weights", tmp / "garbage.params"], ["garbage.params"],
                absent=[tmp / "out" / "checkpoints"], forbidden=["weights_only=False", "weights_only` set to `False"])


@case("resume-into-a-folder-that-holds-no-run")
def _(tmp: Path) -> Case:
    (tmp / "out").mkdir()
    (tmp / "out" / "notes.txt").write_text("my notes\n")
    return Case(["train", "--data-root", tree(tmp), "--out", tmp / "out", *TINY_CAMS],
                ["out", "no wsss run"], absent=[tmp / "out" / "checkpoints"])


@case("mxnet-missing-file")
def _(tmp: Path) -> Case:
    return Case(convert_args(tmp, tmp / "absent.params"), ["absent.params", "not found"],
                absent=[tmp / "out" / "converted.pth"])


@case("mxnet-truncated")
def _(tmp: Path) -> Case:
    data = _one_tensor_params()
    (tmp / "half.params").write_bytes(data[: len(data) // 2])
    return Case(convert_args(tmp, tmp / "half.params"), ["half.params"],
                absent=[tmp / "out" / "converted.pth"])


@case("mxnet-unknown-record-version")
def _(tmp: Path) -> Case:
    data = bytearray(_one_tensor_params())
    data[24:28] = struct.pack("<I", 0xF993FACF)  # the record magic after the 24-byte header
    (tmp / "future.params").write_bytes(bytes(data))
    return Case(convert_args(tmp, tmp / "future.params"), ["future.params"],
                absent=[tmp / "out" / "converted.pth"])


@case("mxnet-wrong-list-magic")
def _(tmp: Path) -> Case:
    data = bytearray(_one_tensor_params())
    data[0:8] = struct.pack("<Q", 0x113)
    (tmp / "magic.params").write_bytes(bytes(data))
    return Case(convert_args(tmp, tmp / "magic.params"), ["magic.params", "0x112"],
                absent=[tmp / "out" / "converted.pth"])


@case("mxnet-missing-tensors")
def _(tmp: Path) -> Case:
    from wsss_bench.weights.mxnet import write_params

    write_params(tmp / "partial.params", {"arg:conv1a_weight": np.zeros((4, 3, 3, 3), np.float32)})
    return Case(convert_args(tmp, tmp / "partial.params"), ["partial.params", "missing"],
                absent=[tmp / "out" / "converted.pth"])


@case("mxnet-names-count-mismatch")
def _(tmp: Path) -> Case:
    arr = np.zeros((2, 3, 3, 3), np.float32)
    data = mx_header(1) + mx_v2_record(arr) + mx_names(["arg:conv1a_weight", "arg:extra"])
    (tmp / "names.params").write_bytes(data)
    return Case(convert_args(tmp, tmp / "names.params"), ["names.params"],
                absent=[tmp / "out" / "converted.pth"])


# features for `wsss cluster` ---------------------------------------------------------------------------
def _features_case(tmp: Path, features: object, allow_pickle: bool = False) -> Case:
    root = tree(tmp)
    with open(tmp / "feats.npy", "wb") as handle:
        np.save(handle, features, allow_pickle=allow_pickle)
    return Case(cluster_args(tmp, root, tmp / "feats.npy"), ["feats.npy"],
                absent=[tmp / "out" / "subcategories"])


@case("features-nan")
def _(tmp: Path) -> Case:
    feats = good_features()
    feats[2, 1] = np.nan
    return _features_case(tmp, feats)


@case("features-inf")
def _(tmp: Path) -> Case:
    feats = good_features()
    feats[4, 0] = np.inf
    return _features_case(tmp, feats)


@case("features-wrong-row-count")
def _(tmp: Path) -> Case:
    return _features_case(tmp, good_features(rows=4))


@case("features-1d")
def _(tmp: Path) -> Case:
    return _features_case(tmp, good_features()[:, 0])


@case("features-pickled-object-array")
def _(tmp: Path) -> Case:
    marker = tmp / "pickle-ran"
    feats = np.array([ExecOnLoad(str(marker))] * len(SPLITS["train_aug"]), dtype=object)
    result = _features_case(tmp, feats, allow_pickle=True)
    result.absent.append(marker)
    return result


@case("features-missing-file")
def _(tmp: Path) -> Case:
    root = tree(tmp)
    return Case(cluster_args(tmp, root, tmp / "nofeats.npy"), ["nofeats.npy"],
                absent=[tmp / "out" / "subcategories"])


# foreign CAM files for `wsss import` --------------------------------------------------------------------
@case("import-pickle-refused-without-trust")
def _(tmp: Path) -> Case:
    marker = tmp / "pickle-ran"
    (tmp / "irn").mkdir()
    np.save(tmp / "irn" / f"{BAD}.npy", np.array({"keys": ExecOnLoad(str(marker))}, dtype=object),
            allow_pickle=True)
    return Case(["import", "--format", "irn", tmp / "irn", "--out", tmp / "out", "--quiet"],
                [f"{BAD}.npy", "pickle"], absent=[marker, tmp / "out" / f"{BAD}.npz"])


@case("import-npy-dir-pickled-array")
def _(tmp: Path) -> Case:
    marker = tmp / "pickle-ran"
    (tmp / "dense").mkdir()
    np.save(tmp / "dense" / "img_000.npy", np.random.default_rng(0).random((3, H, W)).astype(np.float32))
    np.save(tmp / "dense" / f"{BAD}.npy", np.array([ExecOnLoad(str(marker))], dtype=object),
            allow_pickle=True)
    return Case(["import", "--format", "npy-dir", tmp / "dense", "--out", tmp / "out",
                 "--num-classes", "3", "--quiet"],
                [f"{BAD}.npy"], absent=[marker, tmp / "out" / "img_000.npz"])


@case("import-npy-dir-nan")
def _(tmp: Path) -> Case:
    (tmp / "dense").mkdir()
    good = np.random.default_rng(0).random((3, H, W)).astype(np.float32)
    np.save(tmp / "dense" / "img_000.npy", good)
    bad = good.copy()
    bad[1, 2, 2] = np.nan
    np.save(tmp / "dense" / f"{BAD}.npy", bad)
    return Case(["import", "--format", "npy-dir", tmp / "dense", "--out", tmp / "out",
                 "--num-classes", "3", "--quiet"],
                [f"{BAD}.npy", "NaN"], absent=[tmp / "out" / "img_000.npz"])


@pytest.mark.parametrize("build", CASES)
def test_bad_input_is_one_clean_error_line(build: Builder, tmp_path: Path) -> None:
    spec = build(tmp_path)
    result = invoke(spec.args)
    assert_user_error(result, spec.needles, tmp_path, spec.absent)
    for text in spec.forbidden:
        assert text not in result.output, describe(result)


# -- controls: good inputs that look odd must work -----------------------------------------------------
def _control_extra_labels(tmp: Path) -> None:
    root = tree(tmp)
    labels = {i: [0] for i in IDS}
    labels.update({"not_in_any_split": [1], "another_extra": [0, 2]})
    (root / "cls_labels.json").write_text(json.dumps(labels))
    assert_ok(invoke(eval_args(tmp, root)))
    assert (tmp / "out" / "results.json").is_file()


def _control_psa_split_lines(tmp: Path) -> None:
    root = tree(tmp)
    split_file(root).write_text("".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n"
                                        for i in SPLITS["train"]))
    assert_ok(invoke(eval_args(tmp, root)))
    assert (tmp / "out" / "results.json").is_file()


def _control_png_named_jpg(tmp: Path) -> None:
    root = tree(tmp)
    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (H, W, 3), dtype=np.uint8))
    image.save(root / "JPEGImages" / f"{BAD}.jpg", format="PNG")
    assert (root / "JPEGImages" / f"{BAD}.jpg").read_bytes()[:4] == b"\x89PNG"
    result = invoke(data_check(root))
    assert_ok(result)
    assert "train: 3 images" in result.output


def _control_palette_masks(tmp: Path) -> None:
    root = tree(tmp, palette=True)
    with Image.open(root / "SegmentationClass" / f"{BAD}.png") as img:
        assert img.mode == "P"
    assert_ok(invoke(data_check(root)))
    assert_ok(invoke(eval_args(tmp, root)))
    assert (tmp / "out" / "results.json").is_file()


def _control_k_larger_than_class(tmp: Path) -> None:
    root = tree(tmp)
    np.save(tmp / "feats.npy", good_features())
    result = invoke(cluster_args(tmp, root, tmp / "feats.npy", k=50))
    assert_ok(result)
    assignment = np.load(tmp / "out" / "subcategories" / "round1.npy")
    assert assignment.shape == (len(SPLITS["train_aug"]), NUM_CLASSES)
    assert assignment.max() < len(SPLITS["train_aug"])


def _control_good_checkpoint(tmp: Path) -> None:
    torch.save(model_state(), tmp / "good.pth")
    assert_ok(invoke(cams_args(tmp, tree(tmp), tmp / "good.pth")))
    assert sorted(p.stem for p in (tmp / "out" / "cams" / "final" / "val").glob("*.npz")) == SPLITS["val"]


def _control_good_cams(tmp: Path) -> None:
    assert_ok(invoke(eval_args(tmp, tree(tmp))))
    assert json.loads((tmp / "out" / "results.json").read_text())["eval_splits"] == ["train"]


def _control_good_params(tmp: Path) -> None:
    from wsss_bench_plugins.backbone_resnet38d import ResNet38d, torch_key_to_mxnet

    from wsss_bench.weights.mxnet import write_params

    reference = ResNet38d(width=WIDTH).state_dict()
    arrays = {f"arg:{torch_key_to_mxnet(k)}" if not k.endswith(("running_mean", "running_var"))
              else f"aux:{torch_key_to_mxnet(k)}": v.numpy()
              for k, v in reference.items() if not k.endswith("num_batches_tracked")}
    write_params(tmp / "good.params", arrays)
    (tmp / "out").mkdir()
    assert_ok(invoke(convert_args(tmp, tmp / "good.params")))
    assert (tmp / "out" / "converted.pth").is_file()


CONTROLS = [
    pytest.param(_control_good_cams, id="good-cams"),
    pytest.param(_control_extra_labels, id="labels-extra-ids-not-in-split"),
    pytest.param(_control_psa_split_lines, id="split-psa-lines"),
    pytest.param(_control_png_named_jpg, id="image-png-named-jpg"),
    pytest.param(_control_palette_masks, id="mask-palette-png"),
    pytest.param(_control_k_larger_than_class, id="features-k-larger-than-class"),
    pytest.param(_control_good_checkpoint, id="ckpt-good"),
    pytest.param(_control_good_params, id="mxnet-good"),
]


@pytest.mark.parametrize("check", CONTROLS)
def test_good_input_control(check: Callable[[Path], None], tmp_path: Path) -> None:
    check(tmp_path)


# -- a plugin that raises while registering ------------------------------------------------------------
def test_plugin_raising_in_registration_is_reported_and_isolated() -> None:
    from wsss_bench import hookimpl, plugins

    class BoomPlugin:
        @hookimpl
        def register_methods(self, register):
            raise RuntimeError("boom while registering")

    name = "boom_plugin_under_test"
    plugins.register_plugin(BoomPlugin(), name)
    try:
        listed = invoke(["list", "methods"])
        assert listed.exit_code == 0, describe(listed)
        assert "Traceback" not in listed.output
        names = [line.split()[0] for line in listed.stdout.splitlines() if line.strip()]
        assert {"cam", "subcat"} <= set(names), describe(listed)
        assert name in listed.output, f"the failing plugin is not named; {describe(listed)}"
        assert "boom while registering" in listed.output, describe(listed)
        shown = invoke(["plugins"])
        assert shown.exit_code == 0, describe(shown)
        assert any(name in line and "FAILED" in line for line in shown.output.splitlines()), describe(shown)
    finally:
        plugins.unregister_plugin(name)
    again = invoke(["list", "methods"])
    assert again.exit_code == 0 and name not in again.output, describe(again)
