"""The VOC-layout reader."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsss_bench.data.voc import VOC_CLASSES, open_split, read_mask, read_split
from wsss_bench.errors import DataError
from tests.conftest import write_voc_tree


def test_reads_split_labels_and_masks(tiny_voc: Path) -> None:
    ds = open_split(tiny_voc, "train_aug")
    assert len(ds.ids) == 8 and ds.class_names == ["class1", "class2", "class3"]
    for image_id in ds.ids:
        mask = ds.load_mask(image_id, ds.load_image(image_id).size)
        present = set(np.unique(mask)) - {0, 255}
        assert present == {c + 1 for c in np.flatnonzero(ds.label(image_id))}


def test_palette_pngs_give_class_indices(tmp_path: Path) -> None:
    root = write_voc_tree(tmp_path / "voc", {"train": ["a", "b"]}, palette=True)
    ds = open_split(root, "train")
    with Image.open(ds.mask_path("a")) as img:
        assert img.mode == "P"
        luminance = np.asarray(img.convert("L"))
    mask = ds.load_mask("a")
    assert set(np.unique(mask)) <= {0, 1, 2, 3, 255}
    assert not np.array_equal(mask, luminance)  # the classic grayscale pitfall


def test_psa_style_split_lines(tiny_voc: Path) -> None:
    lines = ["/JPEGImages/img_000.jpg /SegmentationClassAug/img_000.png", "/JPEGImages/img_001.jpg"]
    (tiny_voc / "ImageSets/Segmentation/psa.txt").write_text("\n".join(lines) + "\n")
    assert read_split(tiny_voc, "psa") == ["img_000", "img_001"]


def test_labels_file_overrides_masks(tiny_voc: Path) -> None:
    (tiny_voc / "cls_labels.json").write_text('{"img_000": [2]}')
    ds = open_split(tiny_voc, "train")
    assert ds.label("img_000").tolist() == [0, 0, 1]


def test_default_class_names_are_voc(tiny_voc: Path) -> None:
    (tiny_voc / "class_names.txt").unlink()
    ds = open_split(tiny_voc, "train")
    assert ds.class_names == VOC_CLASSES


@pytest.mark.parametrize("content, pattern", [
    ("", "is empty"),
    ("img_000\nimg_000\n", "duplicate id"),
    ("../etc/passwd\n", "cannot read an image id|unsafe"),
    ("a/../../b\n", "cannot read an image id|unsafe"),
    ("..\n", "unsafe"),
])
def test_bad_split_lists(tiny_voc: Path, content: str, pattern: str) -> None:
    (tiny_voc / "ImageSets/Segmentation/bad.txt").write_text(content)
    with pytest.raises(DataError, match=pattern):
        read_split(tiny_voc, "bad")


def test_missing_root_and_split(tmp_path: Path, tiny_voc: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        open_split(tmp_path / "nope", "train")
    with pytest.raises(DataError, match="not a VOC-layout tree"):
        open_split(tmp_path, "train")
    with pytest.raises(DataError, match="available splits: train, train_aug, val"):
        open_split(tiny_voc, "test")


def test_missing_image(tiny_voc: Path) -> None:
    (tiny_voc / "JPEGImages/img_002.jpg").unlink()
    with pytest.raises(DataError, match="img_002.jpg: image listed"):
        open_split(tiny_voc, "train")


def test_corrupt_image(tiny_voc: Path) -> None:
    (tiny_voc / "JPEGImages/img_001.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    ds = open_split(tiny_voc, "train")
    with pytest.raises(DataError, match="img_001.jpg: corrupt"):
        ds.load_image("img_001")


def test_mask_size_mismatch(tiny_voc: Path) -> None:
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tiny_voc / "SegmentationClassAug/img_001.png")
    ds = open_split(tiny_voc, "train")
    with pytest.raises(DataError, match="img_001.png: mask is 5x5 but its image is 40x32"):
        ds.load_mask("img_001", ds.load_image("img_001").size)


def test_mask_values_out_of_range(tmp_path: Path) -> None:
    path = tmp_path / "m.png"
    Image.fromarray(np.full((4, 4), 9, np.uint8)).save(path)
    with pytest.raises(DataError, match=r"values \[9\] outside 0..3"):
        read_mask(path, 3)


def test_rgb_mask_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path)
    with pytest.raises(DataError, match="mode RGB"):
        read_mask(path, 3)
