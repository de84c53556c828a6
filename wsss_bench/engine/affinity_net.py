"""AffinityNet (PSA): three feature levels of a backbone, 1x1 convs to 448 channels, pair affinities.

The head follows PSA's ``network/resnet38_aff.py``: ``f8_3``, ``f8_4``, ``f8_5`` (1x1, no bias,
ELU) on three stride-8 feature levels (``conv4``, ``conv5``, ``conv6`` of ResNet-38, 512, 1024
and 4096 channels -> 64, 128 and 256), concatenated, then ``f9`` (448 -> 448, 1x1, no bias,
ELU).  The backbone's modules are registered at the top level of this module, beside the head,
so the state dict has exactly PSA's keys (``conv1a.weight``, ``b4_5.bn_branch2a.weight``, ...,
``f8_3.weight``, ``f9.weight``) and PSA's released ``res38_aff.pth`` loads strictly as it is.

Any backbone plugin that declares three ``feature_levels`` of one stride and returns them from
``forward_levels(x)`` can carry the head (the backbone contract, :mod:`wsss_bench.contracts`).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import PluginError

#: PSA's feature levels on ResNet-38, in head order.
PSA_LEVELS = ("conv4", "conv5", "conv6")
#: PSA's head widths (64 + 128 + 256 = 448).
PSA_WIDTHS = (64, 128, 256)
HEAD_NAMES = ("f8_3", "f8_4", "f8_5")


class AffinityNet(nn.Module):
    """A backbone with PSA's affinity head; ``forward(x)`` gives the ``[B, 448, h, w]`` features
    whose L1 distances are the pair affinities (:func:`wsss_bench.engine.random_walk.pair_affinity`).
    """

    def __init__(self, backbone: nn.Module, levels: Optional[Sequence[str]] = None,
                 widths: Sequence[int] = PSA_WIDTHS) -> None:
        super().__init__()
        declared = getattr(backbone, "feature_levels", None) or {}
        levels = tuple(levels or (PSA_LEVELS if all(n in declared for n in PSA_LEVELS) else declared))
        if len(levels) != 3 or len(widths) != 3:
            raise PluginError(f"AffinityNet needs three feature levels of the backbone; it declares "
                              f"{sorted(declared) or 'none'}")
        missing = [n for n in levels if n not in declared]
        if missing or not callable(getattr(backbone, "forward_levels", None)):
            raise PluginError(f"the backbone declares no feature level(s) {missing or list(levels)} "
                              "with forward_levels(x); AffinityNet cannot be built on it")
        strides = {declared[n].stride for n in levels}
        if len(strides) != 1:
            raise PluginError(f"AffinityNet needs feature levels of one stride, got {sorted(strides)}")
        # Non-persistent buffers (input constants) are the backbone's own business: they are
        # in no state dict, and a backbone that keeps them moves them to its input's device.
        transient = getattr(backbone, "_non_persistent_buffers_set", set())
        if any(True for _ in backbone.parameters(recurse=False)) or any(
                name not in transient for name, _ in backbone.named_buffers(recurse=False)):
            raise PluginError("AffinityNet registers the backbone's submodules by name; this backbone "
                              "holds parameters of its own outside submodules")
        # The backbone's submodules become ours under their own names (PSA's key layout); the
        # backbone object itself is kept unregistered, to call its forward_levels.
        for name, child in backbone.named_children():
            if name in HEAD_NAMES or name == "f9":
                raise PluginError(f"the backbone has a submodule named {name!r}, a name of the affinity head")
            self.add_module(name, child)
        object.__setattr__(self, "_backbone", backbone)
        self.levels = levels
        self.stride = strides.pop()
        for name, level, width in zip(HEAD_NAMES, levels, widths):
            self.add_module(name, nn.Conv2d(declared[level].channels, int(width), 1, bias=False))
        total = int(sum(widths))
        self.f9 = nn.Conv2d(total, total, 1, bias=False)
        self.out_channels = total
        for conv in (self.f8_3, self.f8_4, self.f8_5):
            nn.init.kaiming_normal_(conv.weight)
        nn.init.xavier_uniform_(self.f9.weight, gain=4)

    def train(self, mode: bool = True) -> "AffinityNet":
        """Train mode for the head; the backbone decides for itself (frozen BN, stem)."""
        super().train(mode)
        self._backbone.train(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` normalised images -> ``[B, 448, h, w]`` affinity features."""
        maps = self._backbone.forward_levels(x)
        parts = [F.elu(getattr(self, name)(maps[level])) for name, level in zip(HEAD_NAMES, self.levels)]
        return F.elu(self.f9(torch.cat(parts, dim=1)))


def head_widths_from_state_dict(state: dict[str, Any]) -> Optional[tuple[int, int, int]]:
    """The head widths stored in an AffinityNet state dict (PSA's or ours), else None."""
    shapes = [state.get(f"{name}.weight") for name in HEAD_NAMES]
    if any(w is None or getattr(w, "ndim", 0) != 4 for w in shapes):
        return None
    return tuple(int(w.shape[0]) for w in shapes)  # type: ignore[return-value, union-attr]


def is_affinity_state(state: dict[str, Any]) -> bool:
    """Whether a state dict holds an affinity head (``f8_3`` ... ``f9``)."""
    return head_widths_from_state_dict(state) is not None and "f9.weight" in state
