"""The multi-label CAM classifier: a backbone, dropout, global average pooling, 1x1 heads.

Heads are bias-free 1x1 convolutions, so a training logit equals the spatial mean of the
pre-ReLU CAM (GAP and a linear map commute); CAMs read the same weights.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

PARENT = "parent"
SUB = "sub"


class Classifier(nn.Module):
    """Backbone + named heads (``parent`` always, ``sub`` for sub-category training)."""

    def __init__(self, backbone: nn.Module, num_classes: int, sub_classes: int = 0,
                 head_dropout: float = 0.5) -> None:
        super().__init__()
        self.backbone = backbone
        channels = int(getattr(backbone, "out_channels"))
        self.dropout = nn.Dropout2d(head_dropout)
        self.heads = nn.ModuleDict({PARENT: nn.Conv2d(channels, num_classes, 1, bias=False)})
        if sub_classes:
            self.heads[SUB] = nn.Conv2d(channels, sub_classes, 1, bias=False)
        for head in self.heads.values():
            # Xavier-uniform with gain 1, as PSA/SC-CAM initialise fc8 / fc8_20 / fc8_200.
            nn.init.xavier_uniform_(head.weight)

    @property
    def num_classes(self) -> int:
        """Number of parent classes."""
        return self.heads[PARENT].out_channels

    def forward(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Training pass: ``({head: logits [N, K]}, pooled features [N, D])``."""
        feats = self.backbone(x)
        pooled = self.dropout(feats).mean(dim=(2, 3), keepdim=True)
        logits = {name: head(pooled).flatten(1) for name, head in self.heads.items()}
        return logits, pooled.flatten(1)

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        """GAP of the final feature map, no dropout: SC-CAM's clustering feature ``[N, D]``."""
        return self.backbone(x).mean(dim=(2, 3))

    def cams(self, x: torch.Tensor, head: str = PARENT) -> torch.Tensor:
        """ReLU class activation maps ``[N, K, h, w]`` from one head's weights."""
        return self.cams_from_features(self.backbone(x), head)

    def cams_from_features(self, feats: torch.Tensor, head: str = PARENT) -> torch.Tensor:
        """CAMs from an already computed feature map."""
        weight = self.heads[head].weight
        return F.relu(F.conv2d(feats, weight.to(feats.dtype)))

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """Trainable backbone parameters (frozen ones are left out)."""
        return (p for p in self.backbone.parameters() if p.requires_grad)

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Head parameters (trained from scratch, hence the larger learning rate)."""
        return (p for p in self.heads.parameters() if p.requires_grad)

    def describe(self) -> dict[str, Any]:
        """Head sizes, for checkpoint metadata."""
        return {name: head.out_channels for name, head in self.heads.items()}
