"""Shared fixtures: hermetic plugin loading, a private cache, tiny VOC trees."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Only the built-in plugins (shipped by wsss-bench itself) load during tests.
os.environ["WSSS_BENCH_DISABLE_PLUGIN_AUTOLOAD"] = "1"


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["WSSS_BENCH_CACHE"] = str(tmp_path_factory.mktemp("cache"))


def write_voc_tree(root: Path, ids_by_split: dict[str, list[str]], num_classes: int = 3,
                   size: tuple[int, int] = (40, 32), seed: int = 0, palette: bool = False) -> Path:
    """A small VOC-layout tree with random images and rectangle masks."""
    rng = np.random.default_rng(seed)
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    mask_dir = root / ("SegmentationClass" if palette else "SegmentationClassAug")
    mask_dir.mkdir(exist_ok=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    all_ids = sorted({i for ids in ids_by_split.values() for i in ids})
    w, h = size
    for image_id in all_ids:
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{image_id}.jpg")
        mask = np.zeros((h, w), np.uint8)
        for c in rng.choice(np.arange(1, num_classes + 1), size=rng.integers(1, 3), replace=False):
            y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
            mask[y:y + 8, x:x + 10] = c
        mask[0, :] = 255
        img = Image.fromarray(mask, mode="L")
        if palette:
            img = img.convert("P")
            pal = [0] * 768
            for c in range(1, 256):
                pal[3 * c:3 * c + 3] = [(c * 37) % 256, (c * 91) % 256, (c * 53) % 256]
            img.putpalette(pal)
        img.save(mask_dir / f"{image_id}.png")
    for split, ids in ids_by_split.items():
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (root / "class_names.txt").write_text("\n".join(f"class{c}" for c in range(1, num_classes + 1)) + "\n")
    return root


@pytest.fixture
def tiny_voc(tmp_path: Path) -> Path:
    """Train (8 images) and val (4 images) splits with 3 classes."""
    ids = [f"img_{i:03d}" for i in range(12)]
    return write_voc_tree(tmp_path / "voc", {"train_aug": ids[:8], "train": ids[:4], "val": ids[8:]})


def write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj))
