"""The ``resnet38d`` backbone: architecture, weight loading, freezing, plugin wiring.

The architecture test compares the module against ``reference_forward`` below, a plain
functional re-statement of spec section 2.1 written over the state-dict tensors, so a wrong
stride, dilation, padding, shortcut or BN placement in the module shows up as a numeric
difference.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import click
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from wsss_bench.errors import ConfigError, WeightsError
from wsss_bench.weights.mxnet import read_params, write_params


def _import_plugin() -> ModuleType:
    try:
        return importlib.import_module("wsss_bench_plugins.backbone_resnet38d")
    except ModuleNotFoundError as exc:
        if exc.name != "wsss_bench_plugins":
            raise
    # A source checkout without `pip install -e .`: map plugins/ to the package name that
    # setup.cfg gives it, then import normally.
    folder = Path(__file__).resolve().parents[1] / "plugins"
    spec = importlib.util.spec_from_file_location(
        "wsss_bench_plugins", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    assert spec is not None and spec.loader is not None
    package = importlib.util.module_from_spec(spec)
    sys.modules["wsss_bench_plugins"] = package
    spec.loader.exec_module(package)
    return importlib.import_module("wsss_bench_plugins.backbone_resnet38d")


r38 = _import_plugin()
ResNet38d = r38.ResNet38d

SMALL = 0.125

# -- independent reference (spec section 2.1) -----------------------------------------------------
# (name, stride, first dilation, dilation, has projection shortcut)
BASIC_UNITS = [
    ("b2", 2, 1, 1, True), ("b2_1", 1, 1, 1, False), ("b2_2", 1, 1, 1, False),
    ("b3", 2, 1, 1, True), ("b3_1", 1, 1, 1, False), ("b3_2", 1, 1, 1, False),
    ("b4", 2, 1, 1, True), *[(f"b4_{i}", 1, 1, 1, False) for i in range(1, 6)],
    ("b5", 1, 1, 2, True), ("b5_1", 1, 2, 2, False), ("b5_2", 1, 2, 2, False),
]
BOTTLENECK_UNITS = [("b6", 4), ("b7", 4)]


def reference_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, eps: float = 1e-5) -> dict[str, torch.Tensor]:
    """ResNet-38 (OS 8) in eval mode, straight from the spec's table."""

    def bn(h: torch.Tensor, p: str) -> torch.Tensor:
        return F.batch_norm(h, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"],
                            sd[f"{p}.bias"], training=False, eps=eps)

    def conv(h: torch.Tensor, p: str, stride: int = 1, dilation: int = 1) -> torch.Tensor:
        w = sd[f"{p}.weight"]
        return F.conv2d(h, w, stride=stride, padding=dilation * (w.shape[-1] // 2), dilation=dilation)

    out = {}
    h = conv(x, "conv1a")
    for name, stride, d1, d2, project in BASIC_UNITS:
        assert (f"{name}.conv_branch1.weight" in sd) == project, name
        a = F.relu(bn(h, f"{name}.bn_branch2a"))
        if name == "b5":
            out["conv4"] = a
        shortcut = conv(a, f"{name}.conv_branch1", stride) if project else h
        t = conv(a, f"{name}.conv_branch2a", stride, d1)
        t = conv(F.relu(bn(t, f"{name}.bn_branch2b1")), f"{name}.conv_branch2b1", 1, d2)
        h = shortcut + t
    for name, dilation in BOTTLENECK_UNITS:
        a = F.relu(bn(h, f"{name}.bn_branch2a"))
        if name == "b6":
            out["conv5"] = a
        t = conv(a, f"{name}.conv_branch2a")
        t = conv(F.relu(bn(t, f"{name}.bn_branch2b1")), f"{name}.conv_branch2b1", 1, dilation)
        t = conv(F.relu(bn(t, f"{name}.bn_branch2b2")), f"{name}.conv_branch2b2")
        h = conv(a, f"{name}.conv_branch1") + t
    out["conv6"] = F.relu(bn(h, "bn7"))
    return out


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Random conv weights and non-trivial BN statistics, so every tensor matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if key.endswith("num_batches_tracked"):
                continue
            if key.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) * 1.5 + 0.5)
            elif key.endswith(".weight") and t.ndim == 1:  # BN gamma
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.ndim == 1:  # BN beta, running_mean
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            else:  # conv: He-normal, keeping activations O(1) through 38 layers
                fan_in = t[0].numel()
                t.copy_(torch.randn(t.shape, generator=g) * (2.0 / fan_in) ** 0.5)


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    return bool(torch.allclose(a, b, rtol=rel, atol=rel * float(b.abs().max())))


def mxnet_name(key: str) -> str:
    """ademxapp's name for a state-dict key, from spec 6.2 (with the arg:/aux: prefix)."""
    stats = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_var"}
    if key == "conv1a.weight":
        return "arg:conv1a_weight"
    parts = key.split(".")
    if parts[0] == "bn7":
        stat = stats[parts[1]]
        return ("aux:" if stat.startswith("moving") else "arg:") + f"bn7_{stat}"
    block, layer, leaf = parts
    level, _, n = block[1:].partition("_")
    unit = f"{level}a" if not n else f"{level}b{n}"
    kind, branch = layer.split("_", 1)
    if kind == "conv":
        return f"arg:res{unit}_{branch}_weight"
    stat = stats[leaf]
    return ("aux:" if stat.startswith("moving") else "arg:") + f"bn{unit}_{branch}_{stat}"


def synthetic_params(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """A full ademxapp-named parameter set with the model's shapes, plus the 1000-way classifier."""
    rng = np.random.default_rng(0)
    params = {
        mxnet_name(k): rng.standard_normal(tuple(t.shape)).astype(np.float32)
        for k, t in model.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    params["arg:linear1000_weight"] = np.zeros((1000, model.out_channels), np.float32)
    params["arg:linear1000_bias"] = np.zeros(1000, np.float32)
    return params


# -- (a) equivalence with the spec ----------------------------------------------------------------
def test_forward_matches_reference_and_cam() -> None:
    model = ResNet38d(width=SMALL).eval()
    randomize(model)
    sd = model.state_dict()
    x = torch.randn(2, 3, 50, 37, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model.forward_named(x)
        want = reference_forward(sd, x)
        assert close(model(x), want["conv6"]) and close(model.forward_features(x), want["conv6"])
        for name in ("conv4", "conv5", "conv6"):
            assert got[name].shape == want[name].shape
            assert close(got[name], want[name]), name
        assert got["conv4"].shape[1] == 64 and got["conv5"].shape[1] == 128
        assert got["conv6"].shape[1] == model.out_channels == 512
        # CAM = ReLU(1x1 conv of conv6 with the head weight), as in forward_cam.
        w = torch.randn(20, model.out_channels, 1, 1, generator=torch.Generator().manual_seed(2))
        assert close(F.relu(F.conv2d(got["conv6"], w)), F.relu(F.conv2d(want["conv6"], w)))
    assert float(want["conv6"].abs().max()) > 0


def test_bn_eps_is_used() -> None:
    model = ResNet38d(width=SMALL, bn_eps=1.001e-5).eval()
    randomize(model)
    x = torch.randn(1, 3, 24, 24)
    with torch.no_grad():
        assert close(model(x), reference_forward(model.state_dict(), x, eps=1.001e-5)["conv6"])


# -- (b) full width: key set, shapes, parameter count ---------------------------------------------
def test_full_width_keys_params_and_conversion() -> None:
    model = ResNet38d()
    sd = model.state_dict()
    weights = [k for k in sd if not k.endswith("num_batches_tracked")]
    assert len(weights) == len(model.weight_keys()) == 191
    assert len(sd) - len(weights) == 37  # one num_batches_tracked per BatchNorm
    learnable = sum(p.numel() for p in model.parameters())
    assert round(learnable / 1e6, 2) == 105.07
    expected_shapes = {
        "conv1a.weight": (64, 3, 3, 3),
        "b2.conv_branch1.weight": (128, 64, 1, 1),
        "b5.conv_branch2a.weight": (512, 512, 3, 3),
        "b5.conv_branch2b1.weight": (1024, 512, 3, 3),
        "b6.conv_branch2a.weight": (512, 1024, 1, 1),
        "b6.conv_branch2b1.weight": (1024, 512, 3, 3),
        "b7.conv_branch2b2.weight": (4096, 2048, 1, 1),
        "bn7.running_var": (4096,),
    }
    for key, shape in expected_shapes.items():
        assert tuple(sd[key].shape) == shape, key
    assert model.out_channels == 4096 and model.stride == 8

    # Each converted tensor is filled with its own index, so a swapped mapping is visible.
    params = {mxnet_name(k): np.full(tuple(sd[k].shape), i, np.float32) for i, k in enumerate(weights)}
    params["arg:linear1000_weight"] = np.zeros((1000, 4096), np.float32)
    converted = r38.convert_mxnet_params(params)
    assert sorted(converted) == sorted(weights)
    # A plain dict without num_batches_tracked loads strictly (BatchNorm defaults them).
    model.load_state_dict(converted, strict=True)
    sd = model.state_dict()
    for i, key in enumerate(weights):
        assert float(sd[key].min()) == float(sd[key].max()) == i, key


# -- (c) loading MXNet and PyTorch files ------------------------------------------------------------
@pytest.mark.parametrize("version", ["v2", "v1", "legacy", "v3"])
def test_load_synthetic_mxnet_params(tmp_path: Path, version: str) -> None:
    model = ResNet38d(width=SMALL)
    params = synthetic_params(model)
    path = tmp_path / "imagenet.params"
    write_params(path, params, version=version)
    report = model.load_pretrained(path)
    assert report["format"] == "mxnet"
    assert len(report["loaded"]) == 191
    assert sorted(report["skipped"]) == ["arg:linear1000_bias", "arg:linear1000_weight"]
    for key, t in model.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(t.numpy(), params[mxnet_name(key)], err_msg=key)


def test_mxnet_prefixes_are_optional(tmp_path: Path) -> None:
    model = ResNet38d(width=SMALL)
    params = {k.split(":", 1)[1]: v for k, v in synthetic_params(model).items()}
    write_params(tmp_path / "w.params", params)
    assert len(model.load_pretrained(tmp_path / "w.params")["loaded"]) == 191
    assert r38.mxnet_key_to_torch("res4b5_branch2b1_weight") == "b4_5.conv_branch2b1.weight"
    assert r38.mxnet_key_to_torch("aux:bn6a_branch2b2_moving_mean") == "b6.bn_branch2b2.running_mean"
    assert r38.mxnet_key_to_torch("bn7_beta") == "bn7.bias"
    assert r38.mxnet_key_to_torch("linear1000_weight") is None


def test_missing_mxnet_tensor_is_named(tmp_path: Path) -> None:
    model = ResNet38d(width=SMALL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = synthetic_params(model)
    del params["aux:bn5b1_branch2b1_moving_var"]
    write_params(tmp_path / "w.params", params)
    with pytest.raises(WeightsError, match=r"w\.params: 1 of 191 backbone tensors missing: "
                                           r"b5_1\.bn_branch2b1\.running_var \(MXNet bn5b1_branch2b1_moving_var\)"):
        model.load_pretrained(tmp_path / "w.params")
    # Nothing was loaded.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_wrong_shape_is_named(tmp_path: Path) -> None:
    model = ResNet38d(width=SMALL)
    params = synthetic_params(model)
    params["arg:res3b2_branch2a_weight"] = np.zeros((32, 32, 1, 1), np.float32)
    write_params(tmp_path / "w.params", params)
    with pytest.raises(WeightsError, match=r"shape mismatch for 1 tensors: arg:res3b2_branch2a_weight -> "
                                           r"b3_2\.conv_branch2a\.weight: file \(32, 32, 1, 1\), model \(32, 32, 3, 3\)"):
        model.load_pretrained(tmp_path / "w.params")
    # A full-width file into a small model is a shape error, not a silent partial load.
    with pytest.raises(WeightsError, match="shape mismatch"):
        ResNet38d(width=0.25).load_pretrained(tmp_path / "w.params")


@pytest.mark.parametrize("variant", ["plain", "module_prefix_no_nbt", "metadata_no_nbt", "wrapped"])
def test_load_pytorch_state_dict(tmp_path: Path, variant: str) -> None:
    source = ResNet38d(width=SMALL)
    randomize(source, seed=3)
    sd = source.state_dict()  # an OrderedDict carrying _metadata, like PSA's saved files
    if variant != "plain":
        for key in [k for k in sd if k.endswith("num_batches_tracked")]:
            del sd[key]
    sd["fc8.weight"] = torch.zeros(20, source.out_channels, 1, 1)
    obj: object = sd
    if variant == "module_prefix_no_nbt":
        obj = {f"module.{k}": v for k, v in sd.items()}
    elif variant == "wrapped":
        obj = {"state_dict": sd, "epoch": 3}
    torch.save(obj, tmp_path / "res38_cls.pth")
    target = ResNet38d(width=SMALL)
    report = target.load_pretrained(tmp_path / "res38_cls.pth")
    assert report["format"] == "torch" and len(report["loaded"]) >= 191
    assert any(k.endswith("fc8.weight") for k in report["skipped"])
    loaded = target.state_dict()
    for key, t in source.state_dict().items():
        assert torch.equal(t, loaded[key]), key


def test_pytorch_missing_key_and_garbage(tmp_path: Path) -> None:
    model = ResNet38d(width=SMALL)
    sd = dict(model.state_dict())
    del sd["b7.conv_branch1.weight"]
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(WeightsError, match=r"partial\.pth: 1 of 191 backbone tensors missing: b7\.conv_branch1\.weight$"):
        model.load_pretrained(tmp_path / "partial.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=r"junk\.pth: neither an MXNet \.params file nor"):
        model.load_pretrained(tmp_path / "junk.pth")
    with pytest.raises(WeightsError, match="not found"):
        model.load_pretrained(tmp_path / "absent.params")


# -- (d) freezing -----------------------------------------------------------------------------------
def test_freeze_behaviour() -> None:
    model = ResNet38d(width=SMALL)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 37
    for mode_call in (lambda: model.train(), lambda: model.train(True), lambda: model.eval().train()):
        mode_call()
        assert model.training
        assert all(not bn.training for bn in bns)
        assert all(not p.requires_grad for bn in bns for p in bn.parameters())
        for name in ResNet38d.STEM:
            assert all(not p.requires_grad for p in getattr(model, name).parameters()), name
        assert model.b3.conv_branch2a.weight.requires_grad and model.b7.conv_branch2b2.weight.requires_grad
        assert model.b6.dropout_2b1.training and model.b6.dropout_2b1.p == 0.3
        assert model.b7.dropout_2b2.p == 0.5
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < trainable < sum(p.numel() for p in model.parameters())
    # Frozen BN: running statistics do not move in a training forward pass.
    before = model.b4.bn_branch2a.running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    assert torch.equal(before, model.b4.bn_branch2a.running_mean)


def test_freeze_can_be_disabled() -> None:
    model = ResNet38d(width=SMALL, freeze_bn=False, freeze_stem=False, dropout=False).train()
    assert all(p.requires_grad for p in model.parameters())
    assert all(m.training for m in model.modules())
    assert isinstance(model.b6.dropout_2b1, torch.nn.Identity)
    # freeze_stem alone: stem fixed (params and BN stats), the rest of the BNs train.
    model = ResNet38d(width=SMALL, freeze_bn=False, freeze_stem=True).train()
    assert not model.b2_1.bn_branch2a.training and model.b3.bn_branch2a.training
    assert model.b3.bn_branch2a.weight.requires_grad and not model.b2.bn_branch2a.weight.requires_grad


# -- (e) output stride ------------------------------------------------------------------------------
@pytest.mark.parametrize(("size", "expected"), [((65, 97), (9, 13)), ((64, 96), (8, 12)), ((33, 17), (5, 3))])
def test_output_stride_8_rounds_up(size: tuple[int, int], expected: tuple[int, int]) -> None:
    model = ResNet38d(width=0.0625).eval()
    with torch.no_grad():
        out = model.forward_named(torch.zeros(1, 3, *size))
    assert all(t.shape[-2:] == expected for t in out.values())


# -- plugin wiring ----------------------------------------------------------------------------------
def test_registration_and_options(tmp_path: Path) -> None:
    calls = []
    r38.register_backbones(register=lambda *a, **kw: calls.append((a, kw)))
    ((name, factory), kw), = calls
    assert name == "resnet38d" and factory is r38.create_resnet38d
    assert kw["options"] is r38.ResNet38dOptions and kw["help"]
    assert set(r38.ResNet38dOptions.model_fields) >= {"width", "dropout", "freeze_bn", "freeze_stem", "pretrained"}
    with pytest.raises(ConfigError, match="widht"):
        r38.create_resnet38d(widht=0.5)
    with pytest.raises(ConfigError, match="width"):
        r38.create_resnet38d(width=0)

    source = ResNet38d(width=SMALL)
    randomize(source, seed=5)
    torch.save(source.state_dict(), tmp_path / "b.pth")
    model = r38.create_resnet38d(width=SMALL, dropout=False, pretrained=str(tmp_path / "b.pth"))
    assert isinstance(model, ResNet38d) and model.out_channels == 512
    assert torch.equal(model.bn7.running_var, source.bn7.running_var)


def test_convert_weights_command(tmp_path: Path) -> None:
    cli = click.Group("wsss")
    from wsss_bench_plugins import commands_resnet38d

    commands_resnet38d.register_commands(cli=cli)
    model = ResNet38d(width=SMALL)
    params = synthetic_params(model)
    write_params(tmp_path / "in.params", params, version="v1")
    out = tmp_path / "out.pth"
    result = CliRunner().invoke(cli, ["convert-weights", str(tmp_path / "in.params"), str(out), "--width", str(SMALL)])
    assert result.exit_code == 0, result.output
    assert "191 tensors" in result.output and "linear1000" in result.output
    assert not (tmp_path / "out.pth.tmp").exists()
    state = torch.load(out, map_location="cpu", weights_only=True)
    assert len(state) == 191
    fresh = ResNet38d(width=SMALL)
    fresh.load_state_dict(state, strict=True)
    np.testing.assert_array_equal(fresh.b4_3.conv_branch2b1.weight.detach().numpy(), params["arg:res4b3_branch2b1_weight"])
    assert ResNet38d(width=SMALL).load_pretrained(out)["format"] == "torch"

    # Default width 1: the small file is rejected with a shape error, and no output is written.
    bad = tmp_path / "bad.pth"
    result = CliRunner().invoke(cli, ["convert-weights", str(tmp_path / "in.params"), str(bad)])
    assert isinstance(result.exception, WeightsError) and "shape mismatch" in str(result.exception)
    assert not bad.exists() and not (tmp_path / "bad.pth.tmp").exists()
    result = CliRunner().invoke(cli, ["convert-weights", str(out), str(bad)])
    assert isinstance(result.exception, WeightsError) and "not an MXNet .params file" in str(result.exception)


def test_reader_output_feeds_conversion(tmp_path: Path) -> None:
    model = ResNet38d(width=SMALL)
    write_params(tmp_path / "w.params", synthetic_params(model), version="legacy")
    converted = r38.convert_mxnet_params(read_params(tmp_path / "w.params"))
    assert len(converted) == 191 and all(t.dtype == torch.float32 for t in converted.values())
