"""Tests of the embedded synthetic dataset plugin (``wsss_bench_plugins.dataset_synthetic``).

Every test generates small specs (tens of images), so the module runs in a few seconds.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsss_bench.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def _load_plugin():
    """Import the plugin; fall back to its file when the repo is not pip-installed."""
    try:
        return importlib.import_module("wsss_bench_plugins.dataset_synthetic")
    except ModuleNotFoundError as exc:
        if exc.name not in ("wsss_bench_plugins", "wsss_bench_plugins.dataset_synthetic"):
            raise
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # for `wsss_bench` itself
    name = "wsss_bench_plugins.dataset_synthetic"
    spec = importlib.util.spec_from_file_location(name, REPO / "plugins" / "dataset_synthetic.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # pydantic resolves annotations through sys.modules
    spec.loader.exec_module(module)
    return module


synth = _load_plugin()

SMALL = dict(seed=3, n_train_aug=30, n_train=10, n_val=8, n_select=5, image_size=64)


def _spec(**overrides) -> "synth.SyntheticSpec":
    return synth.SyntheticSpec(**{**SMALL, **overrides})


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _split(root: Path, name: str) -> list[str]:
    return (root / "ImageSets" / "Segmentation" / f"{name}.txt").read_text().split()


def _mask(root: Path, image_id: str) -> np.ndarray:
    return np.asarray(Image.open(root / "SegmentationClassAug" / f"{image_id}.png"))


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return synth.generate(tmp_path_factory.mktemp("syn") / "data", _spec())


@pytest.fixture(scope="module")
def medium(tmp_path_factory) -> Path:
    """Enough images (120) for frequency statistics such as context co-occurrence."""
    return synth.generate(tmp_path_factory.mktemp("syn") / "data",
                          _spec(n_train_aug=120, n_train=20, n_val=0, seed=11))


# ----------------------------------------------------------------------------- determinism


def test_same_spec_gives_byte_identical_files(small, tmp_path):
    again = synth.generate(tmp_path / "again", _spec())
    assert _files(again) == _files(small)


def test_different_seed_gives_different_images(small, tmp_path):
    other = synth.generate(tmp_path / "other", _spec(seed=4))
    a, b = _files(small), _files(other)
    jpgs = [k for k in a if k.startswith("JPEGImages/")]
    assert sum(a[k] != b[k] for k in jpgs) == len(jpgs)
    meta_a = json.loads(a["synthetic.json"])
    meta_b = json.loads(b["synthetic.json"])
    assert meta_a["spec_fingerprint"] != meta_b["spec_fingerprint"]
    assert meta_a["content_sha256"] != meta_b["content_sha256"]


def test_split_sizes_do_not_change_other_images(small, tmp_path):
    other = synth.generate(tmp_path / "other", _spec(n_val=3, n_train_aug=20))
    a, b = _files(small), _files(other)
    for image_id in _split(other, "train_aug") + _split(other, "val"):
        for rel in (f"JPEGImages/{image_id}.jpg", f"SegmentationClassAug/{image_id}.png"):
            assert a[rel] == b[rel], rel


# ----------------------------------------------------------------------------- layout


def test_layout_and_splits(small):
    spec = _spec()
    for rel in ("class_names.txt", "cls_labels.json", "subtypes.json", "contexts.json",
                "synthetic.json"):
        assert (small / rel).is_file(), rel
    train_aug, train, val, select = (_split(small, s) for s in ("train_aug", "train", "val", "select"))
    assert len(train_aug) == spec.n_train_aug and len(val) == spec.n_val and len(select) == spec.n_select
    assert train == train_aug[: spec.n_train]  # VOC convention: train is a subset
    assert not set(val) & set(train_aug)
    assert not set(select) & (set(train_aug) | set(val))  # select never overlaps a reported split
    assert len(set(train_aug)) == len(train_aug)
    for image_id in train_aug + val + select:
        assert image_id.startswith("syn_") and len(image_id) == 10
        assert (small / "JPEGImages" / f"{image_id}.jpg").is_file()
        assert (small / "SegmentationClassAug" / f"{image_id}.png").is_file()
    names = (small / "class_names.txt").read_text().splitlines()
    assert names == synth.class_names(spec.num_classes) and len(set(names)) == len(names)
    labels = json.loads((small / "cls_labels.json").read_text())
    assert set(labels) == set(train_aug) | set(val) | set(select)
    meta = json.loads((small / "synthetic.json").read_text())
    assert meta["spec"] == spec.model_dump()
    assert meta["spec_fingerprint"] == spec.fingerprint()
    assert meta["format_version"] == synth.FORMAT_VERSION
    assert meta["splits"] == {"train_aug": 30, "train": 10, "val": 8, "select": 5}


def test_images_and_masks_formats(small):
    spec = _spec()
    c = spec.num_classes
    allowed = set(range(c + 1)) | {255}
    for image_id in _split(small, "train_aug") + _split(small, "val"):
        with Image.open(small / "JPEGImages" / f"{image_id}.jpg") as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            size = im.size
        with Image.open(small / "SegmentationClassAug" / f"{image_id}.png") as m:
            assert m.format == "PNG" and m.mode == "L"
            assert m.size == size == (spec.image_size, spec.image_size)
            values = set(np.unique(np.asarray(m)).tolist())
        assert values <= allowed and 0 in values


def test_labels_agree_with_masks(small):
    labels = json.loads((small / "cls_labels.json").read_text())
    subtypes = json.loads((small / "subtypes.json").read_text())
    spec = _spec()
    for image_id, lab in labels.items():
        in_mask = sorted(int(v) - 1 for v in np.unique(_mask(small, image_id)) if 0 < v < 255)
        assert lab == in_mask and lab, image_id  # no label without pixels, no empty image
        assert sorted({cls for cls, _ in subtypes[image_id]}) == lab
        assert all(0 <= s < spec.subtypes for _, s in subtypes[image_id])


def test_subtype_labels_name_the_largest_visible_object(small):
    """subtype_labels.json: per class, the sub-type of its largest visible object (ties: lowest id)."""
    spec = _spec()
    truth = json.loads((small / "subtype_labels.json").read_text())
    assert truth["format"] == synth.SUBTYPE_FORMAT
    assert truth["num_subtypes"] == [spec.subtypes] * spec.num_classes
    checked_multi = 0
    for split, n in (("train_aug", spec.n_train_aug), ("val", spec.n_val), ("select", spec.n_select)):
        for index in range(n):
            scene = synth.render_scene(spec, split, index)
            image_id = _split(small, split)[index]
            assert truth["labels"][image_id] == scene.truth
            for c in range(spec.num_classes):
                present = c in scene.labels
                assert (scene.truth[c] >= 0) == present
            per_class = {}
            for cls, sub in scene.subtypes:
                per_class.setdefault(cls, []).append(sub)
            for cls, subs in per_class.items():
                assert scene.truth[cls] in subs
                checked_multi += len(subs) > 1
    assert checked_multi >= 1  # the rule was exercised on a class shown twice


def test_largest_subtypes_rule_by_hand():
    """Class 0 shown three times (4, 6 and 6 labelled pixels): the first 6-pixel object wins."""
    from types import SimpleNamespace

    objects = [SimpleNamespace(cls=0, subtype=2), SimpleNamespace(cls=0, subtype=1),
               SimpleNamespace(cls=1, subtype=0), SimpleNamespace(cls=0, subtype=0)]
    ids = np.zeros((4, 8), np.int16)
    ids.ravel()[:4] = 1       # object 1: 4 px, sub-type 2
    ids.ravel()[4:10] = 2     # object 2: 6 px, sub-type 1
    ids.ravel()[10:11] = 3    # object 3: class 1, 1 px
    ids.ravel()[11:17] = 4    # object 4: 6 px, sub-type 0 (ties with object 2, higher id)
    assert synth._largest_subtypes(objects, ids, 3) == [1, 0, -1]


def test_occluded_objects_keep_visible_pixels():
    # Big objects and many of them force occlusion; every listed object must stay visible.
    spec = _spec(max_objects=6, min_object_scale=0.3, max_object_scale=0.4, min_visible=0.3)
    for i in range(25):
        scene = synth.render_scene(spec, "train_aug", i)
        for cls in scene.labels:
            assert ((scene.mask == cls + 1).sum()) > 0
        assert {c for c, _ in scene.subtypes} == set(scene.labels)


def test_every_class_and_multilabel_images(small):
    labels = json.loads((small / "cls_labels.json").read_text())
    train_aug = _split(small, "train_aug")
    seen = {c for i in train_aug for c in labels[i]}
    assert seen == set(range(_spec().num_classes))
    assert sum(len(labels[i]) >= 2 for i in train_aug) >= 3


def test_ignore_band_option(tmp_path):
    spec = _spec(n_train_aug=6, n_train=0, n_val=0)
    with_band = synth.generate(tmp_path / "a", spec)
    without = synth.generate(tmp_path / "b", spec.model_copy(update={"ignore_border": False}))
    for image_id in _split(with_band, "train_aug"):
        m1, m0 = _mask(with_band, image_id), _mask(without, image_id)
        assert (m1 == 255).any() and not (m0 == 255).any()
        # The band only replaces object pixels, and it is thin: most object pixels survive.
        assert (m0[m1 == 255] > 0).all()
        assert (m1 == m0)[m1 != 255].all()
        assert (m1 == 255).sum() < 0.5 * (m0 > 0).sum()


def test_world_tables_are_distinct():
    bodies = {synth.body_of(c, s) for c in range(synth.MAX_CLASSES)
              for s in range(synth.MAX_SUBTYPES)}
    assert len(bodies) == synth.MAX_CLASSES * synth.MAX_SUBTYPES
    markers = {synth.marker_of(c) for c in range(synth.MAX_CLASSES)}
    assert len(markers) == synth.MAX_CLASSES
    # Sub-types of one class differ in shape, palette and texture (up to 3 sub-types) ...
    for c in range(synth.MAX_CLASSES):
        for attr in zip(*(synth.body_of(c, s) for s in range(3))):
            assert len(set(attr)) == 3
    # ... while every body attribute value is shared by several classes.
    for k in range(3):
        owners: dict = {}
        for c in range(6):
            for s in range(3):
                owners.setdefault(synth.body_of(c, s)[k], set()).add(c)
        assert all(len(v) >= 2 for v in owners.values())


# ----------------------------------------------------------------------------- context


def test_context_cooccurrence(medium):
    spec = _spec(n_train_aug=120, n_train=20, n_val=0, seed=11)
    labels = json.loads((medium / "cls_labels.json").read_text())
    contexts = json.loads((medium / "contexts.json").read_text())
    ids = _split(medium, "train_aug")
    for k in range(spec.num_classes):
        with_k = [i for i in ids if k in labels[i]]
        rate = np.mean([k in contexts[i] for i in with_k])
        if k < spec.context_classes:
            assert rate >= 0.6, (k, rate)  # nominal 0.8
        else:
            assert not any(k in contexts[i] for i in ids)  # no context texture of its own
    # Context textures are rare without their class (distractors only).
    for k in range(spec.context_classes):
        without = [i for i in ids if k not in labels[i]]
        assert np.mean([k in contexts[i] for i in without]) < 0.2


def test_context_is_visible_and_labelled_background(medium):
    """Water (class 0's context) makes background pixels blue; it is never labelled as object."""
    labels = json.loads((medium / "cls_labels.json").read_text())
    contexts = json.loads((medium / "contexts.json").read_text())

    def blueness(image_id: str) -> float:
        img = np.asarray(Image.open(medium / "JPEGImages" / f"{image_id}.jpg"), np.float32)
        bg = _mask(medium, image_id) == 0
        return float((img[..., 2] - img[..., 0])[bg].mean())

    ids = [i for i in labels if 0 in labels[i]]
    on_water = [blueness(i) for i in ids if 0 in contexts[i]]
    dry = [blueness(i) for i in ids if 0 not in contexts[i]]
    assert on_water and dry
    assert np.mean(on_water) > np.mean(dry) + 20


def test_context_patches_do_not_change_masks():
    """Objects are placed before contexts are drawn, so a context only changes pixels that the
    mask calls background: masks with and without contexts are identical."""
    always = _spec(context_prob=1.0, context_distractor_prob=0.0)
    never = _spec(context_prob=0.0, context_distractor_prob=0.0)
    n_context = 0
    for i in range(20):
        a, b = (synth.render_scene(s, "train_aug", i) for s in (always, never))
        assert np.array_equal(a.mask, b.mask) and a.labels == b.labels and not b.contexts
        assert a.contexts == [k for k in (0, 1) if k in a.labels]
        n_context += bool(a.contexts)
    assert n_context >= 3


# ----------------------------------------------------------------------------- writing


def test_atomic_write_leaves_no_temp(small):
    leftovers = [p.name for p in small.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert leftovers == []


def test_failed_generation_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synth, "_encode_png", boom)
    with pytest.raises(RuntimeError):
        synth.generate(tmp_path / "data", _spec(n_train_aug=3, n_train=1, n_val=1))
    assert list(tmp_path.iterdir()) == []


def test_regenerates_over_other_spec_but_not_foreign_folder(tmp_path):
    out = tmp_path / "data"
    synth.generate(out, _spec(n_train_aug=4, n_train=1, n_val=1))
    synth.generate(out, _spec(n_train_aug=5, n_train=1, n_val=1))
    assert len(_split(out, "train_aug")) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserError):
        synth.generate(foreign, _spec(n_train_aug=2, n_train=1, n_val=0))
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_prepare_reuses_cache_without_rewriting(tmp_path):
    opts = dict(SMALL, n_train_aug=6, n_train=2, n_val=2)
    ds = synth.SyntheticDataset(**opts)
    assert ds.class_names == synth.class_names(6)
    root = ds.prepare(None, tmp_path)
    assert root == tmp_path / f"synthetic-{ds.fingerprint}"
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    again = synth.SyntheticDataset(**opts).prepare(None, tmp_path)
    assert again == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == stamps
    # A different spec gets its own folder; an explicit root is honoured.
    other = synth.SyntheticDataset(**dict(opts, seed=9)).prepare(None, tmp_path)
    assert other != root and other.parent == tmp_path
    explicit = synth.SyntheticDataset(**opts).prepare(tmp_path / "here", tmp_path / "cache")
    assert explicit == tmp_path / "here" and (explicit / "synthetic.json").is_file()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_incomplete_tree_is_regenerated(tmp_path):
    spec = _spec(n_train_aug=3, n_train=1, n_val=1)
    out = synth.generate(tmp_path / "data", spec)
    (out / "JPEGImages" / "syn_000001.jpg").unlink()
    assert not synth.is_complete(out, spec)
    synth.generate(out, spec)
    assert (out / "JPEGImages" / "syn_000001.jpg").is_file() and synth.is_complete(out, spec)


# ----------------------------------------------------------------------------- options, hooks


@pytest.mark.parametrize("bad", [
    {"num_classes": 0}, {"num_classes": 21}, {"image_size": 16}, {"n_train": 500},
    {"context_classes": 7, "num_classes": 6}, {"context_prob": 1.5}, {"colour": "red"},
])
def test_options_are_validated(bad):
    with pytest.raises(Exception) as info:
        synth.SyntheticOptions(**bad)
    assert type(info.value).__name__ == "ValidationError"
    with pytest.raises(synth.ConfigError):
        synth.SyntheticDataset(**bad)


def test_fingerprint_tracks_every_field():
    base = synth.SyntheticSpec()
    assert base.fingerprint() == synth.SyntheticSpec().fingerprint()
    for name, value in [("seed", 1), ("ignore_border", False), ("noise_std", 3.0)]:
        assert base.model_copy(update={name: value}).fingerprint() != base.fingerprint()


def test_register_datasets_hook():
    calls = []
    synth.register_datasets(register=lambda *a, **k: calls.append((a, k)))
    (args, kwargs), = calls
    assert args == ("synthetic", synth.SyntheticDataset)
    assert kwargs["options"] is synth.SyntheticOptions and kwargs["help"]


def test_register_datasets_through_pluggy():
    import pluggy

    from wsss_bench import hookspecs

    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(synth)
    names = []
    pm.hook.register_datasets(register=lambda name, *a, **k: names.append(name))
    assert names == ["synthetic"]


@pytest.mark.parametrize("core_defines_data", [True, False])
def test_cli_data_synth(tmp_path, core_defines_data):
    import click
    from click.testing import CliRunner

    @click.group()
    def cli() -> None:
        """wsss"""

    if core_defines_data:
        @cli.group("data")
        def data() -> None:
            """Dataset utilities."""

    synth.register_commands(cli=cli)
    assert "synth" in cli.commands["data"].commands
    out = tmp_path / "d"
    args = ["data", "synth", "--out", str(out), "--seed", "2", "--n-train-aug", "4",
            "--n-train", "2", "--n-val", "1", "--num-classes", "3", "--no-ignore-border",
            "--preview", str(tmp_path / "p.png")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == str(out)
    assert "generated" in lines[1] and "3 classes" in lines[1]
    assert (tmp_path / "p.png").is_file()
    meta = json.loads((out / "synthetic.json").read_text())
    assert meta["spec"]["num_classes"] == 3 and meta["spec"]["ignore_border"] is False
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0 and "reused" in again.output
    bad = CliRunner().invoke(cli, ["data", "synth", "--out", str(out), "--num-classes", "0"])
    assert bad.exit_code != 0 and isinstance(bad.exception, UserError)
