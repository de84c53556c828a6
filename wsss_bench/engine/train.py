"""Classifier training: the PSA/SC-CAM recipe (poly-LR SGD, 10x heads, multi-label soft margin)."""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..config import TrainConfig
from ..data.transforms import TrainTransform
from ..data.voc import VOCDataset
from ..progress import progress_bar
from .model import PARENT, Classifier


class LabelledImages(Dataset):
    """Images of a split with one multi-hot target per head."""

    def __init__(self, dataset: VOCDataset, targets: dict[str, np.ndarray],
                 transform: TrainTransform, seed: int) -> None:
        self.dataset = dataset
        self.targets = targets
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image_id = self.dataset.ids[index]
        # A generator per (seed, epoch, index) makes augmentation independent of worker count.
        rng = random.Random(hash((self.seed, self.epoch, index)))
        torch.manual_seed(rng.getrandbits(63))
        image = self.transform(self.dataset.load_image(image_id), rng)
        return image, {name: torch.from_numpy(t[index]) for name, t in self.targets.items()}


@dataclass
class TrainLog:
    """Per-epoch mean losses and timing."""

    epoch_losses: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    images_per_second: float = 0.0


def poly_lr(base: float, step: int, max_step: int, power: float) -> float:
    """PSA's poly schedule: ``base * (1 - step / max_step) ** power``."""
    return base * (1 - step / max_step) ** power


def make_optimizer(model: Classifier, cfg: TrainConfig) -> torch.optim.SGD:
    """SGD with a backbone group (lr) and a head group (lr x head_lr_mult), both weight-decayed."""
    momentum = cfg.weight_decay if cfg.psa_momentum_quirk else cfg.momentum
    groups = [
        {"params": list(model.backbone_parameters()), "lr": cfg.lr, "initial_lr": cfg.lr},
        {"params": list(model.head_parameters()), "lr": cfg.lr * cfg.head_lr_mult,
         "initial_lr": cfg.lr * cfg.head_lr_mult},
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=momentum, weight_decay=cfg.weight_decay)


def train_classifier(model: Classifier, dataset: VOCDataset, cfg: TrainConfig,
                     device: torch.device, seed: int,
                     extra_targets: Optional[dict[str, np.ndarray]] = None,
                     loss_weights: Optional[dict[str, float]] = None,
                     show_progress: bool = False, description: str = "train",
                     on_snapshot: Optional[Callable[[int], None]] = None) -> TrainLog:
    """Train ``model`` in place on ``dataset`` (parent labels + optional extra heads' targets)."""
    targets = {PARENT: np.stack([dataset.label(i) for i in dataset.ids]).astype(np.float32)}
    for name, value in (extra_targets or {}).items():
        targets[name] = np.asarray(value, np.float32)
    weights = {name: 1.0 for name in targets} | (loss_weights or {})
    data = LabelledImages(dataset, targets,
                          TrainTransform(cfg.resize_long, cfg.crop_size, cfg.color_jitter), seed)
    generator = torch.Generator().manual_seed(seed)
    drop_last = len(data) >= cfg.batch_size
    loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=True, drop_last=drop_last,
                        num_workers=cfg.num_workers, generator=generator,
                        persistent_workers=False)
    steps_per_epoch = len(loader)
    max_step = max(1, steps_per_epoch * cfg.epochs)
    optimizer = make_optimizer(model, cfg)
    model.to(device).train()
    log = TrainLog()
    start, seen, step = time.perf_counter(), 0, 0
    for epoch in range(cfg.epochs):
        data.epoch = epoch
        totals: dict[str, float] = {}
        batches = progress_bar(loader, f"{description} epoch {epoch + 1}/{cfg.epochs}",
                               show_progress, total=steps_per_epoch)
        for images, batch_targets in batches:
            for group in optimizer.param_groups:
                group["lr"] = poly_lr(group["initial_lr"], step, max_step, cfg.poly_power)
            images = images.to(device, non_blocking=True)
            logits, _ = model(images)
            losses = {name: F.multilabel_soft_margin_loss(logits[name], batch_targets[name].to(device))
                      for name in targets}
            loss = sum(weights[name] * value for name, value in losses.items())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            seen += images.shape[0]
            for name, value in losses.items():
                totals[name] = totals.get(name, 0.0) + float(value.detach())
        log.epoch_losses.append({k: v / max(1, steps_per_epoch) for k, v in totals.items()})
        if on_snapshot is not None:
            on_snapshot(epoch)
    log.seconds = time.perf_counter() - start
    log.images_per_second = seen / log.seconds if log.seconds else 0.0
    model.eval()
    return log
