"""Which backbone a classifier checkpoint was made with, so ``--weights FILE`` is enough.

Inference from a checkpoint (``wsss cams``, ``wsss extract-features``, SC-CAM's
``round0_weights``) takes the architecture from the file, in this order:

1. our own checkpoints record ``backbone: {name, options}`` in their metadata: used as is;
2. otherwise (PSA's ``res38_cls.pth``, SC-CAM's round files, any plain state dict) every
   registered backbone is asked: a backbone factory may expose
   ``options_from_state_dict(state_dict) -> dict | None``, reading its own key layout and tensor
   shapes (ResNet-38's width from ``conv1a``); ``None`` means "not my layout".  The core never
   names a backbone: the first one that recognises the keys wins, in name order;
3. when none does, the configured backbone is used (and a mismatch is reported by the strict
   load, naming the keys).

Options that only matter for training keep the configured values; an option named
``pretrained`` is switched off, since the weights come from the checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from .checkpoints import to_internal_keys
from .plugins import registry


@dataclass(frozen=True)
class BackboneChoice:
    """The backbone to build for a checkpoint and where that choice came from."""

    name: str
    options: dict[str, Any]
    #: ``recorded`` (our metadata), ``inferred`` (a plugin read the keys) or ``configured``.
    source: str


def backbone_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The backbone's tensors of a checkpoint, keys as the backbone module names them."""
    prefix = "backbone."
    return {k[len(prefix):]: v for k, v in to_internal_keys(dict(state)).items() if k.startswith(prefix)}


def _without_pretrained(name: str, options: dict[str, Any]) -> dict[str, Any]:
    if "pretrained" not in options:
        return options
    model = registry("backbone").get(name).options
    default = model.model_fields["pretrained"].default if model is not None and "pretrained" in model.model_fields else None
    return {**options, "pretrained": False if isinstance(default, bool) else None}


def infer_backbone(state: Mapping[str, torch.Tensor]) -> Optional[tuple[str, dict[str, Any]]]:
    """(name, options) from the first registered backbone that recognises ``state``'s keys."""
    tensors = backbone_state(state)
    if not tensors:
        return None
    reg = registry("backbone")
    for name in reg.names():
        reader = getattr(reg.get(name).factory, "options_from_state_dict", None)
        if reader is None:
            continue
        options = reader(tensors)
        if options is not None:
            return name, dict(options)
    return None


def backbone_for_checkpoint(state: Mapping[str, torch.Tensor], meta: Mapping[str, Any],
                            configured_name: str, configured_options: Mapping[str, Any]) -> BackboneChoice:
    """The backbone a checkpoint needs (module docstring): recorded, inferred or configured."""
    recorded = meta.get("backbone")
    if isinstance(recorded, Mapping) and isinstance(recorded.get("name"), str):
        name, options, source = recorded["name"], dict(recorded.get("options") or {}), "recorded"
    else:
        found = infer_backbone(state)
        if found is None:
            return BackboneChoice(configured_name, dict(configured_options), "configured")
        name, options, source = found[0], found[1], "inferred"
    if name == configured_name:
        # The file decides the architecture; the user's other settings of the same backbone stay.
        options = {**dict(configured_options), **options}
    return BackboneChoice(name, _without_pretrained(name, options), source)
