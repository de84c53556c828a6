"""Classifier training: the PSA/SC-CAM recipe (poly-LR SGD, 10x heads, multi-label soft margin)."""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from .. import io
from ..config import TrainConfig
from ..data.transforms import TrainTransform
from ..data.voc import VOCDataset
from ..device import autocast, derive_seed
from ..distributed import Distributed
from ..errors import ConfigError, UserError
from ..progress import epoch_line, on_terminal, progress_bar
from .model import PARENT, Classifier

_log = logging.getLogger("wsss_bench")


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; nothing of the training is written."""


class LabelledImages(Dataset):
    """Images of a split with one multi-hot target per head."""

    def __init__(self, dataset: VOCDataset, targets: dict[str, np.ndarray],
                 transform: TrainTransform, seed: int) -> None:
        self.dataset = dataset
        self.targets = targets
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset.ids)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        epoch, index = item
        image_id = self.dataset.ids[index]
        # Randomness depends only on (seed, epoch, index): augmentation is the same whatever the
        # worker count, and a resumed run sees exactly the images an uninterrupted one would.
        rng = random.Random(derive_seed(self.seed, epoch, index))
        torch.manual_seed(rng.getrandbits(63))  # ColorJitter draws from torch's global RNG
        image = self.transform(self.dataset.load_image(image_id), rng)
        return image, {name: torch.from_numpy(t[index]) for name, t in self.targets.items()}


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[tuple[int, int]]]:
    """The shuffled batches of one epoch (last partial batch dropped when a full one exists)."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    stop = n - n % batch_size if n >= batch_size else n
    return [[(epoch, int(i)) for i in order[b:b + batch_size]] for b in range(0, stop, batch_size)]


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
                     state_file: Optional[Path] = None, state_key: str = "",
                     job: Optional[Distributed] = None) -> TrainLog:
    """Train ``model`` in place on ``dataset`` (parent labels + optional extra heads' targets).

    With ``state_file``, the full training state (weights, optimizer, epoch, step, log) is saved
    atomically after every epoch and picked up again when it exists with the same
    ``state_key``: a killed run resumes at the last finished epoch and ends with the weights an
    uninterrupted run would have.  ``cfg.snapshot_epoch`` keeps the weights after that epoch
    (SC-CAM's mid-schedule checkpoints) instead of the last ones.

    Under ``torchrun`` (``job.world_size > 1``) the model is wrapped in DistributedDataParallel
    and process r takes items ``r, r + W, ...`` of every global batch, so the batches, the
    learning-rate schedule and the averaged gradient are those of one process with the same
    ``batch_size`` (BatchNorm statistics are per process, as with plain DDP).  Rank 0 writes
    the resume file.
    """
    job = job or Distributed()
    if job.enabled and cfg.batch_size < job.world_size:
        raise ConfigError(f"train.batch_size={cfg.batch_size} is smaller than the {job.world_size} "
                          "processes: every process needs at least one image per batch")
    targets = {PARENT: np.stack([dataset.label(i) for i in dataset.ids]).astype(np.float32)}
    for name, value in (extra_targets or {}).items():
        targets[name] = np.asarray(value, np.float32)
    weights = {name: 1.0 for name in targets} | (loss_weights or {})
    data = LabelledImages(dataset, targets,
                          TrainTransform(cfg.resize_long, cfg.crop_size, cfg.color_jitter), seed)
    steps_per_epoch = len(epoch_batches(len(data), cfg.batch_size, seed, 0))
    max_step = max(1, steps_per_epoch * cfg.epochs)
    optimizer = make_optimizer(model, cfg)
    model.to(device).train()
    forward: torch.nn.Module = model
    if job.enabled:
        # DDP broadcasts rank 0's weights now and averages gradients in backward().
        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    log = TrainLog()
    first_epoch, step = 0, 0
    snapshot: Optional[dict[str, torch.Tensor]] = None
    resumed = load_train_state(state_file, state_key, model, optimizer)
    if resumed is not None:
        first_epoch, step, log.epoch_losses, snapshot = resumed
    start, seen = time.perf_counter(), 0
    for epoch in range(first_epoch, cfg.epochs):
        batches_of_epoch = [b[job.rank::job.world_size]
                            for b in epoch_batches(len(data), cfg.batch_size, seed, epoch)]
        loader = DataLoader(data, batch_sampler=batches_of_epoch, num_workers=cfg.num_workers)
        totals: dict[str, float] = {}
        batches = progress_bar(loader, f"{description} epoch {epoch + 1}/{cfg.epochs}",
                               show_progress, total=steps_per_epoch, summary=False)
        epoch_start, epoch_seen = time.perf_counter(), seen
        for images, batch_targets in batches:
            for group in optimizer.param_groups:
                group["lr"] = poly_lr(group["initial_lr"], step, max_step, cfg.poly_power)
            torch.manual_seed(derive_seed(seed, 1 << 20, step))  # dropout masks depend on the step only
            images = images.to(device, non_blocking=True)
            with autocast(device, cfg.precision):
                logits, _ = forward(images)
            losses = {name: F.multilabel_soft_margin_loss(logits[name].float(), batch_targets[name].to(device))
                      for name in targets}
            loss = sum(weights[name] * value for name, value in losses.items())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            seen += images.shape[0]
            for name, value in losses.items():
                number = float(value.detach())
                if not math.isfinite(number):
                    raise _diverged(cfg, description, state_file, job,
                                    f"epoch {epoch + 1}, step {step} ({name} loss {number})")
                totals[name] = totals.get(name, 0.0) + number
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            # A step so large that the weights overflow while the loss it was computed from was
            # still finite: caught before the epoch's state (or a checkpoint) is saved.
            raise _diverged(cfg, description, state_file, job,
                            f"epoch {epoch + 1} (the weights became NaN or infinite)")
        log.epoch_losses.append({k: v / max(1, steps_per_epoch) for k, v in totals.items()})
        if show_progress and not on_terminal():
            elapsed = time.perf_counter() - epoch_start
            rate = (seen - epoch_seen) / elapsed if elapsed > 0 else 0.0
            _log.info(epoch_line(description, epoch + 1, cfg.epochs, log.epoch_losses[-1], rate,
                                 elapsed * (cfg.epochs - epoch - 1)))
        if epoch == cfg.snapshot_epoch:
            snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if state_file is not None and job.is_main:
            save_train_state(state_file, state_key, model, optimizer, epoch + 1, step,
                             log.epoch_losses, snapshot)
    if snapshot is not None:
        model.load_state_dict(snapshot)
    log.seconds = time.perf_counter() - start
    log.images_per_second = seen / log.seconds if log.seconds else 0.0
    model.eval()
    return log


def _diverged(cfg: TrainConfig, description: str, state_file: Optional[Path], job: Distributed,
              where: str) -> TrainingDiverged:
    """The error for a diverged training, after removing its resume state (resuming a
    diverging training would only diverge again); nothing non-finite is ever saved."""
    if state_file is not None and job.is_main:
        Path(state_file).unlink(missing_ok=True)
    return TrainingDiverged(f"{description}: training diverged at {where}; lower train.lr (now "
                            f"{cfg.lr}) or train.head_lr_mult (now {cfg.head_lr_mult})")


def save_train_state(path: Path, key: str, model: Classifier, optimizer: torch.optim.Optimizer,
                     epoch: int, step: int, losses: list[dict[str, float]],
                     snapshot: Optional[dict[str, torch.Tensor]] = None) -> None:
    """Atomically save everything needed to continue training after ``epoch``."""
    payload = {"key": key, "epoch": epoch, "step": step, "losses": losses,
               "model": model.state_dict(), "optimizer": optimizer.state_dict(),
               "snapshot": snapshot or {}}
    io.write_torch(path, payload)


def load_train_state(path: Optional[Path], key: str, model: Classifier,
                     optimizer: torch.optim.Optimizer
                     ) -> Optional[tuple[int, int, list[dict[str, float]], Optional[dict[str, torch.Tensor]]]]:
    """Restore a saved training state for the same inputs; ``None`` when there is none."""
    if path is None or not Path(path).is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a damaged state file only costs the epochs it held
        return None
    if not isinstance(state, dict) or state.get("key") != key:
        return None
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["epoch"]), int(state["step"]), list(state["losses"]), state.get("snapshot") or None
