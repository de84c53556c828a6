"""Any timm model as a CAM backbone: ``timm:<model name>``, e.g. ``timm:resnet18``.

Models are built without pretrained weights unless ``pretrained: true`` (which needs the
weights cached locally).  ``output_stride`` (8, 16 or 32) turns late downsampling into dilation
for the model families that support it (ResNets, ConvNeXt...), which gives finer CAMs.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from wsss_bench.errors import ConfigError, WeightsError
from wsss_bench.contracts import FeatureLevel
from wsss_bench.hookspecs import hookimpl


class TimmOptions(BaseModel):
    """Options of a timm backbone."""

    model_config = ConfigDict(extra="forbid")
    variant: str = Field(description="timm model name (the part after 'timm:')")
    pretrained: bool = False
    output_stride: Optional[int] = Field(default=None, description="8, 16 or 32")
    freeze_bn: bool = False
    drop_path_rate: float = Field(default=0.0, ge=0, lt=1)


class TimmBackbone(nn.Module):
    """The last feature map of a timm model, with its channel count and stride declared."""

    def __init__(self, variant: str, pretrained: bool = False, output_stride: Optional[int] = None,
                 freeze_bn: bool = False, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        import timm

        if variant not in timm.list_models():
            import difflib

            close = difflib.get_close_matches(variant, timm.list_models(), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown timm model {variant!r}.{hint}")
        kwargs: dict[str, Any] = {"features_only": True, "pretrained": pretrained}
        if output_stride is not None:
            kwargs["output_stride"] = output_stride
        if drop_path_rate:
            kwargs["drop_path_rate"] = drop_path_rate
        try:
            self.body = timm.create_model(variant, **kwargs)
        except (RuntimeError, OSError) as exc:
            raise WeightsError(f"timm model {variant!r}: {exc}") from None
        except (TypeError, AssertionError, ValueError) as exc:
            raise ConfigError(f"timm model {variant!r} does not accept these options ({exc})") from None
        info = self.body.feature_info
        self.out_channels = int(info.channels()[-1])
        self.stride = int(info.reduction()[-1])
        self.variant = variant
        self.freeze_bn = freeze_bn
        #: The last three feature maps when they share one stride (dilated models, e.g.
        #: ``output_stride=8`` on a ResNet): what AffinityNet reads (:meth:`forward_levels`).
        last = list(zip(info.module_name(), info.channels(), info.reduction()))[-3:]
        self.feature_levels = ({name: FeatureLevel(int(ch), int(st)) for name, ch, st in last}
                               if len(last) == 3 and len({st for _, _, st in last}) == 1 else {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The deepest feature map ``[N, out_channels, H/stride, W/stride]``."""
        return self.body(x)[-1]

    def forward_levels(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The :attr:`feature_levels` maps by name (empty when none are declared)."""
        maps = self.body(x)
        names = list(self.feature_levels)
        return dict(zip(names, maps[-len(names):])) if names else {}

    def train(self, mode: bool = True) -> "TimmBackbone":
        super().train(mode)
        if mode and self.freeze_bn:
            # Small WSSS batches give noisy batch statistics; frozen BN (as IRN does) avoids that.
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self


#: What the conformance kit (wsss_bench.testing) builds: the factory needs a model name.
TimmBackbone.conformance_cases = [("timm:resnet18", {}), ("timm:resnet18", {"output_stride": 16})]  # type: ignore[attr-defined]


@hookimpl
def register_backbones(register: Any) -> None:
    register("timm", TimmBackbone, help="any timm model by name: timm:<model>, e.g. timm:resnet18",
             options=TimmOptions)
