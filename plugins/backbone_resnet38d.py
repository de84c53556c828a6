"""ResNet-38 "resnet38d": the wide, dilated ResNet that PSA and SC-CAM use as their backbone.

This is ademxapp's ImageNet "Model A1" (a pre-activation wide ResNet) with the last two
downsamplings replaced by dilation, so the output stride is 8.  Module names are those of PSA's
``network/resnet38d.py``, so :meth:`ResNet38d.state_dict` has exactly the backbone keys of
PSA's ``res38_cls.pth`` / ``res38_aff.pth`` and SC-CAM's checkpoints::

    conv1a                                    3x3 conv, 3 -> 64
    b2, b2_1, b2_2        basic blocks        64 -> 128, stride 2 in b2        (stride 2)
    b3, b3_1, b3_2        basic blocks        128 -> 256, stride 2 in b3       (stride 4)
    b4, b4_1 .. b4_5      basic blocks        256 -> 512, stride 2 in b4       (stride 8)
    b5, b5_1, b5_2        basic blocks        512 -> 1024, dilation 2 (b5's first conv: 1)
    b6                    bottleneck          1024 -> 2048, dilation 4, Dropout2d 0.3
    b7                    bottleneck          2048 -> 4096, dilation 4, Dropout2d 0.5
    bn7 + ReLU                                "conv6", 4096 channels

At width 1 the backbone state dict holds 191 weight tensors (conv weights, BN gamma/beta/
running_mean/running_var) and 105.07 M learnable parameters.  It also holds one
``num_batches_tracked`` buffer per BatchNorm (37 of them); those are bookkeeping only (BN is
frozen and uses a fixed momentum), so :meth:`ResNet38d.load_pretrained` takes them from the
file when present and keeps the model's own value otherwise.  That lets PSA checkpoints load
strictly whether or not they were saved with them.

The ImageNet weights are an MXNet ``.params`` file; :func:`convert_mxnet_params` maps
ademxapp's names (``res4b2_branch2a_weight``, ``bn7_moving_var``, ...) to these keys, and the
``wsss convert-weights IN.params OUT.pth`` command does it once, offline.

Input: RGB scaled to [0, 1] and normalised with the ImageNet mean/std; the data pipeline does
that, not the backbone.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from wsss_bench.contracts import FeatureLevel
from wsss_bench.checkpoints import describe_load_error
from wsss_bench.errors import ConfigError, WeightsError
from wsss_bench.hookspecs import hookimpl
from wsss_bench.weights.mxnet import is_params_file, read_params

__all__ = [
    "ResBlock",
    "ResBlockBot",
    "ResNet38d",
    "ResNet38dOptions",
    "create_resnet38d",
    "convert_mxnet_params",
    "mxnet_key_to_torch",
    "torch_key_to_mxnet",
    "options_from_state_dict",
    "register_backbones",
]

log = logging.getLogger(__name__)

_NBT = "num_batches_tracked"
# How many names an error message lists before it says "... and N more".
_SHOW = 8


def _scaled(channels: int, width: float) -> int:
    """Channel count ``channels`` scaled by ``width`` (at least 1)."""
    return max(1, int(round(channels * width)))


class ResBlock(nn.Module):
    """Pre-activation basic residual unit: BN-ReLU, then two 3x3 convs; 1x1 projection shortcut.

    ``project`` says whether the unit has the ``conv_branch1`` shortcut.  It is decided from
    the architecture at width 1 (``in != out or stride != 1``), not from the scaled widths, so
    the key set is the same at every width.
    """

    def __init__(
        self,
        in_channels: int,
        mid_channels: int,
        out_channels: int,
        stride: int = 1,
        first_dilation: Optional[int] = None,
        dilation: int = 1,
        project: bool = False,
        bn_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        first_dilation = dilation if first_dilation is None else first_dilation
        self.project = project
        self.bn_branch2a = nn.BatchNorm2d(in_channels, eps=bn_eps)
        self.conv_branch2a = nn.Conv2d(in_channels, mid_channels, 3, stride, padding=first_dilation,
                                       dilation=first_dilation, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(mid_channels, eps=bn_eps)
        self.conv_branch2b1 = nn.Conv2d(mid_channels, out_channels, 3, padding=dilation,
                                        dilation=dilation, bias=False)
        if project:
            self.conv_branch1 = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: torch.Tensor, get_x_bn_relu: bool = False) -> Any:
        """Return the unit's output, and with ``get_x_bn_relu`` also its pre-activated input."""
        a = F.relu(self.bn_branch2a(x))
        # The projection reads the *pre-activated* input; the identity shortcut the raw one.
        shortcut = self.conv_branch1(a) if self.project else x
        h = self.conv_branch2a(a)
        h = self.conv_branch2b1(F.relu(self.bn_branch2b1(h)))
        out = shortcut + h  # no activation after the sum (pre-activation design)
        return (out, a) if get_x_bn_relu else out


class ResBlockBot(nn.Module):
    """Pre-activation bottleneck unit (1x1 -> dilated 3x3 -> 1x1) with a 1x1 projection.

    Dropout2d sits before both the 3x3 and the last 1x1 conv, as in PSA (ademxapp only had it
    before the last one; weights are unaffected).
    """

    def __init__(
        self,
        in_channels: int,
        mid1_channels: int,
        mid2_channels: int,
        out_channels: int,
        stride: int = 1,
        dilation: int = 1,
        dropout: float = 0.0,
        bn_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.bn_branch2a = nn.BatchNorm2d(in_channels, eps=bn_eps)
        self.conv_branch2a = nn.Conv2d(in_channels, mid1_channels, 1, stride, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(mid1_channels, eps=bn_eps)
        self.dropout_2b1: nn.Module = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_branch2b1 = nn.Conv2d(mid1_channels, mid2_channels, 3, padding=dilation,
                                        dilation=dilation, bias=False)
        self.bn_branch2b2 = nn.BatchNorm2d(mid2_channels, eps=bn_eps)
        self.dropout_2b2: nn.Module = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_branch2b2 = nn.Conv2d(mid2_channels, out_channels, 1, bias=False)
        self.conv_branch1 = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: torch.Tensor, get_x_bn_relu: bool = False) -> Any:
        """Return the unit's output, and with ``get_x_bn_relu`` also its pre-activated input."""
        a = F.relu(self.bn_branch2a(x))
        shortcut = self.conv_branch1(a)
        h = self.conv_branch2a(a)
        h = self.conv_branch2b1(self.dropout_2b1(F.relu(self.bn_branch2b1(h))))
        h = self.conv_branch2b2(self.dropout_2b2(F.relu(self.bn_branch2b2(h))))
        out = shortcut + h
        return (out, a) if get_x_bn_relu else out


class ResNet38d(nn.Module):
    """Wide ResNet-38 with output stride 8 (PSA's ``resnet38d``).

    ``forward(x)`` returns "conv6" = ReLU(bn7(b7 output)), ``[N, out_channels, ceil(H/8),
    ceil(W/8)]``; :meth:`forward_named` also returns "conv4" and "conv5".

    Args:
        width: channel multiplier applied to every conv (1 = the published network; e.g. 0.125
            gives a CPU-sized model with the same structure and key set).
        dropout: use PSA's Dropout2d (0.3 in b6, 0.5 in b7) in training mode.
        freeze_bn: keep every BatchNorm in eval mode (ImageNet statistics) with frozen affine
            parameters, re-applied on every :meth:`train` call.
        freeze_stem: freeze ``conv1a, b2, b2_1, b2_2`` (no gradients; their BNs in eval mode).
        bn_eps: BatchNorm epsilon (PyTorch default 1e-5; ademxapp trained with 1.001e-5).
    """

    #: Output stride of the final feature map.
    stride: int = 8
    #: Modules PSA never trains.
    STEM = ("conv1a", "b2", "b2_1", "b2_2")

    def __init__(
        self,
        width: float = 1.0,
        dropout: bool = True,
        freeze_bn: bool = True,
        freeze_stem: bool = True,
        bn_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if not width > 0:
            raise ConfigError(f"resnet38d: width must be > 0, got {width}")
        self.width = float(width)
        self.freeze_bn = freeze_bn
        self.freeze_stem = freeze_stem

        def c(n: int) -> int:
            return _scaled(n, width)

        def basic(i: int, m: int, o: int, stride: int = 1, first: Optional[int] = None, dil: int = 1) -> ResBlock:
            return ResBlock(c(i), c(m), c(o), stride, first, dil, project=(i != o or stride != 1), bn_eps=bn_eps)

        self.conv1a = nn.Conv2d(3, c(64), 3, padding=1, bias=False)
        self.b2 = basic(64, 128, 128, stride=2)
        self.b2_1 = basic(128, 128, 128)
        self.b2_2 = basic(128, 128, 128)
        self.b3 = basic(128, 256, 256, stride=2)
        self.b3_1 = basic(256, 256, 256)
        self.b3_2 = basic(256, 256, 256)
        self.b4 = basic(256, 512, 512, stride=2)
        self.b4_1 = basic(512, 512, 512)
        self.b4_2 = basic(512, 512, 512)
        self.b4_3 = basic(512, 512, 512)
        self.b4_4 = basic(512, 512, 512)
        self.b4_5 = basic(512, 512, 512)
        # From here on PSA trades stride for dilation, keeping the map at stride 8.
        self.b5 = basic(512, 512, 1024, first=1, dil=2)
        self.b5_1 = basic(1024, 512, 1024, dil=2)
        self.b5_2 = basic(1024, 512, 1024, dil=2)
        self.b6 = ResBlockBot(c(1024), c(512), c(1024), c(2048), dilation=4,
                              dropout=0.3 if dropout else 0.0, bn_eps=bn_eps)
        self.b7 = ResBlockBot(c(2048), c(1024), c(2048), c(4096), dilation=4,
                              dropout=0.5 if dropout else 0.0, bn_eps=bn_eps)
        self.bn7 = nn.BatchNorm2d(c(4096), eps=bn_eps)
        self.out_channels: int = c(4096)
        #: The maps :meth:`forward_levels` returns (PSA's AffinityNet reads all three).
        self.feature_levels = {"conv4": FeatureLevel(c(512), 8), "conv5": FeatureLevel(c(1024), 8),
                               "conv6": FeatureLevel(c(4096), 8)}
        # Freeze now, not only in train(): optimisers are often built from
        # `p.requires_grad` before train() is ever called.
        self._apply_freeze()

    # -- forward ------------------------------------------------------------------------------
    def forward_named(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return ``{"conv4", "conv5", "conv6"}``: the BN-ReLU'd inputs of b5 (512w ch) and b6
        (1024w ch), and ReLU(bn7(b7 output)) (4096w ch), all at stride 8."""
        x = self.conv1a(x)
        for name in ("b2", "b2_1", "b2_2", "b3", "b3_1", "b3_2",
                     "b4", "b4_1", "b4_2", "b4_3", "b4_4", "b4_5"):
            x = getattr(self, name)(x)
        x, conv4 = self.b5(x, get_x_bn_relu=True)
        x = self.b5_2(self.b5_1(x))
        x, conv5 = self.b6(x, get_x_bn_relu=True)
        x = self.b7(x)
        conv6 = F.relu(self.bn7(x))
        return {"conv4": conv4, "conv5": conv5, "conv6": conv6}

    def forward_levels(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The :attr:`feature_levels` maps (the backbone contract's name for :meth:`forward_named`)."""
        return self.forward_named(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return conv6, the map CAMs are read from: ``[N, out_channels, ceil(H/8), ceil(W/8)]``."""
        return self.forward_named(x)["conv6"]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Alias of :meth:`forward` (the backbone contract's name)."""
        return self.forward(x)

    # -- freezing -----------------------------------------------------------------------------
    def _apply_freeze(self) -> None:
        if self.freeze_stem:
            for name in self.STEM:
                module = getattr(self, name)
                for p in module.parameters():
                    p.requires_grad_(False)
                # A frozen stem must also be a fixed function, so its BN stats stay put too.
                for m in module.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
        if self.freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
                    for p in m.parameters():
                        p.requires_grad_(False)

    def train(self, mode: bool = True) -> "ResNet38d":
        """Set train/eval mode, then re-freeze BN and stem as configured (PSA's behaviour)."""
        super().train(mode)
        self._apply_freeze()
        return self

    # -- weights ------------------------------------------------------------------------------
    def weight_keys(self) -> list[str]:
        """State-dict keys a pretrained file must provide: everything but ``num_batches_tracked``
        (191 at any width)."""
        return [k for k in self.state_dict() if not k.endswith("." + _NBT)]

    def load_pretrained(self, path: Union[str, "os.PathLike[str]"]) -> dict[str, Any]:
        """Load backbone weights from an MXNet ``.params`` file or a PyTorch ``.pth`` state dict.

        The format is detected from the file's first bytes.  MXNet names are mapped with
        :func:`convert_mxnet_params` (``arg:``/``aux:`` prefixes optional; the ImageNet
        classifier ``linear1000_*`` is dropped).  PyTorch keys may carry a ``module.`` prefix,
        and the state dict may be wrapped in ``{"state_dict": ...}`` or ``{"model": ...}``;
        keys the backbone does not have (heads such as ``fc8``) are skipped.

        Every backbone tensor must be present with the model's shape, otherwise
        :class:`WeightsError` names the missing or mismatched keys and nothing is loaded.
        Returns ``{"format": "mxnet" | "torch", "loaded": [model keys], "skipped": [file keys]}``.
        """
        path = Path(path)
        if not path.is_file():
            raise WeightsError(f"{path}: weights file not found")
        if is_params_file(path):
            params = read_params(path)
            state, origin, skipped = _map_mxnet(params, str(path))
            fmt = "mxnet"
        else:
            state, skipped = _read_torch_state(path)
            origin = {k: k for k in state}
            fmt = "torch"
        current = self.state_dict()
        matched, extra = _match_state(current, state, origin, str(path), mxnet=fmt == "mxnet")
        skipped += extra
        full = dict(matched)
        # num_batches_tracked policy (see module docstring): the file's value if it has one,
        # else the model's own, so strict loading works for files with and without them.
        for key, value in current.items():
            if key.endswith("." + _NBT) and key not in full:
                full[key] = value
        self.load_state_dict(full, strict=True)
        if skipped:
            log.info("%s: skipped %d non-backbone keys: %s", path, len(skipped), _listing(skipped))
        return {"format": fmt, "loaded": list(matched), "skipped": skipped}


# -- MXNet name mapping -----------------------------------------------------------------------
_PREFIX = r"(?:arg:|aux:)?"
_UNIT = r"(?P<level>\d)(?P<unit>a|b(?P<n>\d+))"
_RE_STEM = re.compile(rf"^{_PREFIX}conv1a_weight$")
_RE_CONV = re.compile(rf"^{_PREFIX}res{_UNIT}_(?P<branch>branch1|branch2a|branch2b1|branch2b2)_weight$")
_RE_BN = re.compile(
    rf"^{_PREFIX}bn{_UNIT}_(?P<branch>branch2a|branch2b1|branch2b2)_(?P<stat>gamma|beta|moving_mean|moving_var)$"
)
_RE_BN7 = re.compile(rf"^{_PREFIX}bn7_(?P<stat>gamma|beta|moving_mean|moving_var)$")
_BN_STAT = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_var": "running_var"}
_STAT_BN = {v: k for k, v in _BN_STAT.items()}


def mxnet_key_to_torch(name: str) -> Optional[str]:
    """Map one ademxapp MXNet name to its ``ResNet38d`` state-dict key, or ``None``.

    ``None`` means "not a backbone tensor": the ImageNet classifier (``linear1000_*``) and any
    name outside ademxapp's scheme.  Examples: ``arg:res4b2_branch2a_weight`` ->
    ``b4_2.conv_branch2a.weight``; ``aux:bn6a_branch2b1_moving_var`` ->
    ``b6.bn_branch2b1.running_var``; ``bn7_gamma`` -> ``bn7.weight``.
    """
    if _RE_STEM.match(name):
        return "conv1a.weight"
    m = _RE_BN7.match(name)
    if m:
        return f"bn7.{_BN_STAT[m['stat']]}"
    m = _RE_CONV.match(name) or _RE_BN.match(name)
    if not m:
        return None
    # res{L}a -> b{L}; res{L}b{n} -> b{L}_{n}
    block = f"b{m['level']}" + (f"_{int(m['n'])}" if m["n"] else "")
    if m.re is _RE_CONV:
        return f"{block}.conv_{m['branch']}.weight"
    return f"{block}.bn_{m['branch']}.{_BN_STAT[m['stat']]}"


def torch_key_to_mxnet(key: str) -> str:
    """Inverse of :func:`mxnet_key_to_torch` without prefix (used to name missing tensors)."""
    if key == "conv1a.weight":
        return "conv1a_weight"
    module, _, leaf = key.rpartition(".")
    if module == "bn7":
        return f"bn7_{_STAT_BN.get(leaf, leaf)}"
    block, _, layer = module.partition(".")
    level, _, n = block[1:].partition("_")
    unit = f"{level}b{n}" if n else f"{level}a"
    kind, _, branch = layer.partition("_")
    if kind == "conv":
        return f"res{unit}_{branch}_weight"
    return f"bn{unit}_{branch}_{_STAT_BN.get(leaf, leaf)}"


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    # Share memory with the reader's buffer when possible (the real file is ~400 MB).
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def _map_mxnet(
    params: Mapping[str, np.ndarray], source: str
) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """Map MXNet names: (tensors by model key, model key -> file key, skipped file keys)."""
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    skipped: list[str] = []
    for name, array in params.items():
        key = mxnet_key_to_torch(name)
        if key is None:
            skipped.append(name)
            continue
        if key in origin:
            raise WeightsError(f"{source}: both {origin[key]!r} and {name!r} map to {key!r}")
        state[key] = _to_tensor(np.asarray(array))
        origin[key] = name
    return state, origin, skipped


def convert_mxnet_params(
    params: Mapping[str, np.ndarray], source: str = "<params>"
) -> dict[str, torch.Tensor]:
    """Convert ademxapp MXNet arrays (as from :func:`~wsss_bench.weights.mxnet.read_params`)
    to ``ResNet38d`` state-dict tensors.

    Names are mapped with :func:`mxnet_key_to_torch`; non-backbone names (``linear1000_*``,
    anything unrecognised) are dropped.  Layouts are identical, so nothing is transposed.
    The result has no ``num_batches_tracked`` entries: pass it to
    ``ResNet38d.load_state_dict`` (a plain dict lets BatchNorm default them) or save it and use
    :meth:`ResNet38d.load_pretrained`.  Coverage is not checked here; ``load_pretrained`` and
    ``wsss convert-weights`` check it against the model.
    """
    return _map_mxnet(params, source)[0]


def _read_torch_state(path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Read a ``.pth`` state dict: (tensors by normalised key, skipped non-tensor keys)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for "not a checkpoint"
        raise WeightsError(
            f"{path}: neither an MXNet .params file nor a loadable PyTorch state dict "
            f"({describe_load_error(exc)})"
        ) from None
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model"):
            inner = obj.get(wrapper)
            if isinstance(inner, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: expected a state dict, found {type(obj).__name__}")
    state: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            skipped.append(str(key))
            continue
        # Checkpoints saved from nn.DataParallel / DDP prefix every key with "module.".
        name = key[len("module."):] if key.startswith("module.") else key
        if name in state:
            raise WeightsError(f"{path}: key {name!r} appears both with and without 'module.'")
        state[name] = value
    return state, skipped


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOW])
    return shown + (f", ... and {len(keys) - _SHOW} more" if len(keys) > _SHOW else "")


def _match_state(
    model_state: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    origin: Mapping[str, str],
    source: str,
    mxnet: bool,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Check ``state`` against the model: (tensors for model keys, skipped file keys).

    ``origin`` maps each key of ``state`` to its name in the file; ``mxnet`` adds the MXNet
    name of missing tensors to the error.  Raises WeightsError if a weight tensor is missing
    or any shape differs.  ``num_batches_tracked`` is optional; it is taken when present.
    """
    matched: dict[str, torch.Tensor] = {}
    skipped = [origin[k] for k in state if k not in model_state]
    missing: list[str] = []
    bad: list[str] = []
    for key, target in model_state.items():
        if key not in state:
            if not key.endswith("." + _NBT):
                missing.append(f"{key} (MXNet {torch_key_to_mxnet(key)})" if mxnet else key)
            continue
        value = state[key]
        if tuple(value.shape) != tuple(target.shape):
            name = origin[key]
            label = key if name == key else f"{name} -> {key}"
            bad.append(f"{label}: file {tuple(value.shape)}, model {tuple(target.shape)}")
            continue
        matched[key] = value
    if missing:
        total = sum(not k.endswith("." + _NBT) for k in model_state)
        raise WeightsError(f"{source}: {len(missing)} of {total} backbone tensors missing: {_listing(missing)}")
    if bad:
        raise WeightsError(f"{source}: shape mismatch for {len(bad)} tensors: " + "; ".join(bad[:_SHOW])
                           + (f"; ... and {len(bad) - _SHOW} more" if len(bad) > _SHOW else ""))
    return matched, skipped


# -- plugin wiring -------------------------------------------------------------------------------
class ResNet38dOptions(BaseModel):
    """Options of the ``resnet38d`` backbone."""

    model_config = ConfigDict(extra="forbid")

    width: float = Field(1.0, gt=0, description="channel multiplier (1 = published widths)")
    dropout: bool = Field(True, description="Dropout2d 0.3/0.5 inside b6/b7")
    freeze_bn: bool = Field(True, description="BN in eval mode with frozen affine parameters")
    freeze_stem: bool = Field(True, description="freeze conv1a, b2, b2_1, b2_2")
    bn_eps: float = Field(1e-5, gt=0, description="BatchNorm epsilon")
    pretrained: Optional[str] = Field(None, description="MXNet .params or PyTorch .pth backbone weights")


def create_resnet38d(**options: Any) -> ResNet38d:
    """Build a :class:`ResNet38d` from :class:`ResNet38dOptions` fields, loading ``pretrained``."""
    try:
        opts = ResNet38dOptions(**options)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'options'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid options for backbone 'resnet38d': {problems}") from None
    model = ResNet38d(width=opts.width, dropout=opts.dropout, freeze_bn=opts.freeze_bn,
                      freeze_stem=opts.freeze_stem, bn_eps=opts.bn_eps)
    if opts.pretrained:
        model.load_pretrained(opts.pretrained)
    return model


def options_from_state_dict(state: Mapping[str, torch.Tensor]) -> Optional[dict[str, Any]]:
    """``{"width": w}`` when ``state`` holds ResNet-38 backbone keys (ours, PSA's, SC-CAM's), else None.

    The width is read from ``bn7`` (4096 x width channels, the widest layer, so the most precise)
    and checked against the stem (``conv1a``: 64 x width), as :func:`_scaled` builds them.
    """
    stem, last = state.get("conv1a.weight"), state.get("bn7.weight")
    if stem is None or last is None or stem.ndim != 4 or last.ndim != 1:
        return None
    width = last.shape[0] / 4096
    if _scaled(64, width) != stem.shape[0]:
        return None
    return {"width": width}


# The host asks backbone factories for this (see wsss_bench.architecture).
create_resnet38d.options_from_state_dict = options_from_state_dict  # type: ignore[attr-defined]


def convert_params_file(path: Union[str, "os.PathLike[str]"], width: float = 1.0) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Read and convert an MXNet ``.params`` file, checked against ``ResNet38d(width)``.

    Returns (the 191 backbone tensors by model key, skipped file keys).  The model is built on
    the ``meta`` device, so checking full-width shapes allocates no memory.
    """
    if not is_params_file(path):
        if not Path(path).is_file():
            raise WeightsError(f"{path}: weights file not found")
        raise WeightsError(f"{path}: not an MXNet .params file (missing the 0x112 magic)")
    params = read_params(path)
    state, origin, skipped = _map_mxnet(params, str(path))
    with torch.device("meta"):
        reference = ResNet38d(width=width).state_dict()
    matched, extra = _match_state(reference, state, origin, str(path), mxnet=True)
    return matched, skipped + extra


#: What the conformance kit (wsss_bench.testing) builds: the full width costs seconds per check.
create_resnet38d.conformance_cases = [("resnet38d", {"width": 0.0625})]  # type: ignore[attr-defined]


@hookimpl
def register_backbones(register: Any) -> None:
    """Register the ``resnet38d`` backbone."""
    register("resnet38d", create_resnet38d, help="Wide ResNet-38 (PSA/SC-CAM), output stride 8",
             options=ResNet38dOptions)
