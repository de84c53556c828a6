"""The conformance kit: check any registered component against its kind's contract.

For plugin authors (and the project's own tests), in the spirit of scikit-learn's
``check_estimator`` / ``parametrize_with_checks``::

    # tests/test_conformance.py of a plugin package
    from wsss_bench.testing import check_component, parametrize_plugins

    @parametrize_plugins("clusterer")
    def test_clusterer_conforms(case):
        check_component(case)

:func:`parametrize_plugins` parametrises over every registered component of a kind (built-in and
third-party alike; pass ``plugin=`` to keep one plugin's).  A component whose factory needs
particular options to be built (``timm`` needs a model name) declares its test cases on the
factory: ``factory.conformance_cases = [("timm:resnet18", {"pretrained": False}), ...]``; an empty
list skips it.  Each ``check_*`` raises ``AssertionError`` or the host's
:class:`~wsss_bench.errors.PluginError` naming what is wrong.

The checks use what the host checks at run time (:mod:`wsss_bench.contracts`) plus what is too
costly to check on every run: determinism where the contract promises it, both input sizes of a
backbone, a clusterer's ``k > N`` and ``k = 1`` cases, a dataset's split lists and labels.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from . import clustering, contracts
from .registry import KINDS, Component


@dataclass(frozen=True)
class Case:
    """One component to check: the name to build it by and its options."""

    kind: str
    name: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        """The pytest id: ``kind:name``."""
        return f"{self.kind}:{self.name}"


def cases(kind: str, plugin: Optional[str] = None) -> list[Case]:
    """Every registered component of ``kind`` as :class:`Case` objects (``plugin``: only its)."""
    from .plugins import registry

    if kind not in KINDS:
        raise ValueError(f"unknown plugin kind {kind!r}; one of {KINDS}")
    reg = registry(kind)
    found = []
    for name in reg.names():
        component = reg.components[name]
        if plugin is not None and component.plugin != plugin:
            continue
        declared = getattr(component.factory, "conformance_cases", None)
        if declared is None:
            found.append(Case(kind, name))
        else:
            found.extend(Case(kind, n, dict(o)) for n, o in declared)
    return found


def parametrize_plugins(kind: str, plugin: Optional[str] = None) -> Callable[[Callable[..., Any]], Any]:
    """A pytest decorator: the test runs once per registered component of ``kind``, given as
    ``case`` (a :class:`Case`)."""
    import pytest

    found = cases(kind, plugin)
    return pytest.mark.parametrize("case", found, ids=[c.id for c in found])


def check_component(case: Case) -> None:
    """Run the check of ``case.kind`` on ``case``."""
    checks = {"backbone": check_backbone, "clusterer": check_clusterer, "method": check_method,
              "dataset": check_dataset, "refiner": check_refiner, "launcher": check_launcher}
    checks[case.kind](case.name, **case.options)


def _component(kind: str, name: str) -> Component:
    from .plugins import registry

    return registry(kind).get(name)


# -- backbones ------------------------------------------------------------------------------------
def check_backbone(name: str, **options: Any) -> None:
    """Attributes, output shape and stride at two input sizes, eval determinism, finiteness of a
    freshly built model, and (when the factory has it) ``options_from_state_dict`` on its own
    state dict."""
    import torch

    from .plugins import registry

    torch.manual_seed(0)
    backbone = registry("backbone").create(name, **options)  # checks out_channels / stride
    backbone.eval()
    with torch.no_grad():
        for size in ((1, 3, 64, 64), (2, 3, 45, 71)):
            x = torch.randn(*size)
            out = backbone(x)
            contracts.check_backbone_output(backbone, x, out, _component("backbone", name), finite=True)
            assert torch.equal(out, backbone(x)), f"backbone {name!r}: two eval forwards differ"
    reader = getattr(_component("backbone", name).factory, "options_from_state_dict", None)
    if reader is not None:
        found = reader(backbone.state_dict())
        assert found is None or isinstance(found, dict), \
            f"backbone {name!r}: options_from_state_dict returned {type(found).__name__}"
        if found is not None:
            rebuilt = registry("backbone").create(name, **{**options, **found})
            rebuilt.load_state_dict(backbone.state_dict(), strict=True)


# -- clusterers -----------------------------------------------------------------------------------
def check_clusterer(name: str, **options: Any) -> None:
    """Labels of the right shape, dtype and range for ``k`` in {1, 2, 3, N + 5}; the same labels
    for the same seed; ``metadata`` and ``choose_k`` honoured when declared."""
    from .plugins import registry

    rng = np.random.default_rng(0)
    features = np.concatenate([rng.normal(0, 0.1, (6, 5)), rng.normal(3, 0.1, (6, 5))]).astype(np.float32)
    n = len(features)
    metadata: clustering.ClusterMetadata = {
        "class_index": 0, "class_name": "thing", "image_ids": [f"i{i}" for i in range(n)],
        "subtypes": np.repeat(np.arange(2), 6).astype(np.int64), "num_subtypes": 2}
    for k in (1, 2, 3, n + 5):
        algo = registry("clusterer").create(name, **options)
        k = clustering.choose_k(algo, k, metadata)  # as the host does: the clusterer's K if it sets one
        first = clustering.fit_predict(algo, features, k, 7, metadata)
        again = clustering.fit_predict(registry("clusterer").create(name, **options), features, k, 7, metadata)
        assert np.array_equal(first, again), f"clusterer {name!r}: seed 7 gave two labelings for k={k}"


# -- refiners ------------------------------------------------------------------------------------
def check_refiner(name: str, **options: Any) -> None:
    """Label maps of the image's size holding only 0, the image's classes and 255, for an image
    with two classes and one without any; the same map twice (determinism)."""
    from PIL import Image

    from .plugins import registry

    rng = np.random.default_rng(0)
    component = _component("refiner", name)
    refiner = registry("refiner").create(name, **options)
    height, width = 37, 53
    image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    yy, xx = np.mgrid[0:height, 0:width]
    for keys in (np.array([1, 4]), np.zeros(0, np.int64)):
        cams = np.stack([np.clip(1 - np.hypot(yy - height * f, xx - width * f) / 25, 0, 1)
                         for f in (0.3, 0.7)[:len(keys)]]).astype(np.float32) if len(keys) else \
            np.zeros((0, height, width), np.float32)
        first = contracts.check_refiner_output(refiner.refine(image, cams, keys), (height, width), keys, 5, component)
        again = refiner.refine(image, cams, keys)
        assert np.array_equal(first, again), f"refiner {name!r}: two refinements of one image differ"


# -- launchers -----------------------------------------------------------------------------------
def check_launcher(name: str, timeout: float = 300.0, **options: Any) -> None:
    """Two jobs through the launcher: one writes a file and exits 3, one is cancelled while it
    sleeps; both are reported ended (``wait``) with the ids ``submit`` gave, and ``state``
    answers for them and for an id it never gave.

    A launcher whose library is not installed raises the host's ConfigError naming its extra.
    """
    import sys
    import time

    from .launching import ACTIVE, ENDED, UNKNOWN, CellJob
    from .plugins import registry

    launcher = registry("launcher").create(name, **options)
    with tempfile.TemporaryDirectory(prefix="wsss-launcher-") as scratch:
        folder = Path(scratch)
        launcher.start(folder / "launcher")
        try:
            marker = folder / "ran.txt"
            job = CellJob("probe", (sys.executable, "-c", f"import pathlib, sys; pathlib.Path({str(marker)!r})"
                                    ".write_text('ran'); sys.exit(3)"), folder, 1, folder / "probe.log")
            job_id = contracts.check_job_id(launcher, launcher.submit(job))
            sleeper = CellJob("sleeper", (sys.executable, "-c", "import time; time.sleep(600)"), folder, 1,
                              folder / "sleeper.log")
            sleeper_id = contracts.check_job_id(launcher, launcher.submit(sleeper))
            assert sleeper_id != job_id, f"launcher {name!r}: two jobs got one id {job_id!r}"
            ends, deadline = [], time.monotonic() + timeout
            while not ends and time.monotonic() < deadline:
                ends = contracts.check_job_ends(launcher, launcher.wait([job_id], 5.0), [job_id])
            assert ends, f"launcher {name!r}: the job did not end within {timeout} s"
            assert ends[0].returncode in (3, None), \
                f"launcher {name!r}: the job exited 3, the launcher says {ends[0].returncode}"
            assert marker.read_text() == "ran", f"launcher {name!r}: the command did not run"
            assert launcher.state(job_id) in (ENDED, UNKNOWN)
            assert launcher.state("no-such-job-0") in (ENDED, UNKNOWN)
            assert launcher.state(sleeper_id) in (ACTIVE, UNKNOWN)
            launcher.cancel(sleeper_id)
            ends, deadline = [], time.monotonic() + 60
            while not ends and time.monotonic() < deadline:
                ends = contracts.check_job_ends(launcher, launcher.wait([sleeper_id], 2.0), [sleeper_id])
            assert ends, f"launcher {name!r}: a cancelled job was not reported ended within 60 s"
            assert ends[0].returncode != 0, f"launcher {name!r}: a cancelled job reported success"
        finally:
            launcher.close()


# -- methods --------------------------------------------------------------------------------------
def check_method(name: str, **options: Any) -> None:
    """The method builds from its options (validated by its model) and has ``run(ctx)``.

    Running it needs data and training; :func:`run_method_on_tiny_data` does that end to end.
    """
    from .plugins import registry

    component = registry("method").get(name)
    method = registry("method").create(name, **options)
    assert isinstance(method, contracts.CamMethod), f"method {name!r}: no run(ctx)"
    component.validate_options(options)


def run_method_on_tiny_data(name: str, out: Path, backbone: str = "resnet38d",
                            backbone_options: Optional[dict[str, Any]] = None, **options: Any) -> dict[str, Any]:
    """Run method ``name`` for one epoch on a tiny generated VOC tree under ``out``; returns the
    results (the host checks the method's outcome)."""
    from .config import load_config
    from .orchestration.runner import run

    root = write_tiny_voc(out / "voc")
    layer = {"device": "cpu", "quiet": True, "dataset": {"name": None, "root": str(root)},
             "method": {"name": name, "options": options},
             "backbone": {"name": backbone, "options": backbone_options if backbone_options is not None else
                          {"width": 0.0625, "freeze_bn": False, "freeze_stem": False}},
             "train": {"epochs": 1, "crop_size": 16, "resize_long": [16, 16], "batch_size": 4},
             "cams": {"scales": [1.0], "flip": False}}
    return run(load_config("smoke", None, [layer]), out / "run")


# -- datasets -------------------------------------------------------------------------------------
def check_dataset(name: str, root: Optional[Path] = None, **options: Any) -> None:
    """``prepare`` gives a VOC-layout folder whose splits, class names, images and labels read.

    A dataset that needs an existing tree (``voc``) is pointed at a tiny one written here when
    ``root`` is not given.
    """
    from .data.voc import available_splits, open_split
    from .errors import UserError
    from .plugins import registry

    with tempfile.TemporaryDirectory(prefix="wsss-conformance-") as scratch:
        cache = Path(scratch) / "cache"
        plugin = registry("dataset").create(name, **options)
        try:
            prepared = plugin.prepare(root, cache)
        except UserError:
            if root is not None:
                raise
            prepared = plugin.prepare(write_tiny_voc(Path(scratch) / "voc"), cache)
        prepared = contracts.check_prepared_root(prepared, _component("dataset", name))
        listed = [s for s in available_splits(prepared)
                  if (prepared / "ImageSets" / "Segmentation" / f"{s}.txt").read_text().strip()]
        assert listed, f"dataset {name!r}: {prepared} has no split list with ids"
        names = getattr(plugin, "class_names", None)
        for split in listed:
            ds = open_split(prepared, split, None, names)
            first = ds.ids[0]
            ds.load_image(first)
            assert ds.label(first).shape == (ds.num_classes,)


def write_tiny_voc(root: Path, n: int = 8, size: int = 24, classes: int = 3) -> Path:
    """A tiny VOC-layout tree (noise images, one square object per image) for checks and tests."""
    from PIL import Image

    rng = np.random.default_rng(0)
    ids = [f"tiny_{i:03d}" for i in range(n)]
    for sub in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    labels = {}
    for i, image_id in enumerate(ids):
        cls = i % classes
        mask = np.zeros((size, size), np.uint8)
        mask[4:4 + size // 2, 4:4 + size // 2] = cls + 1
        image = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        image[mask > 0] = (60 * (cls + 1)) % 255
        Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.jpg")
        Image.fromarray(mask).save(root / "SegmentationClassAug" / f"{image_id}.png")
        labels[image_id] = [cls]
    half = n // 2
    for split, members in {"train_aug": ids[:half + 2], "train": ids[:half], "val": ids[half:]}.items():
        (root / "ImageSets/Segmentation" / f"{split}.txt").write_text("\n".join(members) + "\n")
    (root / "class_names.txt").write_text("\n".join(f"class{c}" for c in range(classes)) + "\n")
    (root / "cls_labels.json").write_text(json.dumps(labels))
    return root
