"""The segmentation stage: DeepLab-v2 (an ASPP head on any backbone) trained on pseudo masks.

The last step of the WSSS pipeline: CAMs -> pseudo masks (``wsss refine`` / ``wsss export-masks``,
VOC-palette ``<id>.png``: 0 background, ``1..C`` classes, 255 unsure) -> a fully supervised
segmentation network trained on the training split's pseudo masks -> label maps of the evaluation
splits, in the same PNG format, scored by :func:`wsss_bench.evaluation.masks.evaluate_masks`.

Training follows DeepLab-v2 as WSSS papers use it (PSA, IRN, SC-CAM): pixel-wise cross-entropy
that ignores the unsure label 255, logits upsampled bilinearly to the crop, SGD with momentum
and a poly schedule, a learning-rate multiplier for the fresh head (DeepLab's 10x), random
scale, flip and crop.  Defaults are scaled to CPU runs on the embedded 96 px dataset and say
why (:class:`SegmentOptions`).

Everything random depends only on ``(seed, epoch, index)`` or ``(seed, step)``: two runs with one
seed end with bit-identical weights on a CPU, and a resumed run (``state_file``) with the weights
of an uninterrupted one.
"""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from .. import io
from ..checkpoints import read_checkpoint, save_checkpoint
from ..config import MAX_SCALE, MAX_SEED, MIN_SCALE, Precision, check_size_range
from ..data.transforms import normalize, random_crop, random_resize_long, resize_by_scale
from ..data.voc import IGNORE_INDEX, VOCDataset, read_mask
from ..device import autocast, derive_seed
from ..errors import ConfigError, DataError, UserError, WeightsError
from ..evaluation.masks import check_mask_dir
from ..evaluation.pseudo_masks import palette_png_bytes
from ..progress import epoch_line, on_terminal, progress_bar
from .train import TrainingDiverged, epoch_batches, poly_lr

__all__ = ["SegmentOptions", "DeepLabASPP", "SegmentTrainReport", "build_segmentation",
           "check_pseudo_masks", "crf_function", "segmentation_loss", "train_segmentation", "predict_probs",
           "predict_split", "save_segmentation", "load_segmentation", "KIND"]

_log = logging.getLogger("wsss_bench")

#: ``meta["kind"]`` of a segmentation checkpoint (classifier checkpoints have none).
KIND = "segmentation"
_STATE_KIND = "segmentation-train-state"


class SegmentOptions(BaseModel):
    """Settings of the segmentation stage (``segment.options.*``).

    DeepLab-v2 on VOC: 20k iterations of batch 10, 321 px crops, lr 2.5e-4 with 10x on the head,
    momentum 0.9, weight decay 5e-4, poly 0.9, random scales 0.5-1.5, single-scale inference.
    The defaults keep the optimiser and the schedule and are scaled to the embedded 96 px
    dataset on a CPU (400 train_aug images, 8 epochs with the default EfficientNet-Lite0 at
    stride 16: ``wsss segment`` took 2.3 minutes on two free cores, 3.9 on one core shared
    with other jobs).  Chosen on the synthetic ``select`` split (never reported), trained on
    the ground truth of ``train_aug``, seed 0, 10 epochs (one shared core, so times are rough)::

        input scale (train / infer)  lr, head      rates        select mIoU   train time
        0.75-1.25x / 1.0x            1e-4, x10     [1, 2, 3]      25.1 %        1x
        0.75-1.25x / 1.0x            1e-3, x1      [1, 2, 3]      25.8 %        1x
        0.75-1.25x / 1.0x, stride 8  1e-4, x10     [1, 2, 3]      20.5 %        2.5x
        1.25-1.67x / 1.5x            1e-4, x10     [1, 2, 3]      42.6 %        1.5x
        1.25-1.67x / 1.5x (chosen)   1e-3, x1      [1, 2, 3]      47.9 %        1.5x

    Then 8 epochs instead of 10 for time (ground-truth masks of train_aug, scored on val:
    37.7 % after 8 epochs, 41.7 % after 10 at 1.3x the time; the loss still falls).

    Resolution is what limits a stride-16 network on 96 px images (6x6 logits), so images are
    enlarged: long side 120-160 px in training (1.25-1.67x, crops of 112) and 1.5x at inference
    (one pass, 9x9 logits).  The head at 10x the backbone's rate needs lr 1e-4 to stay stable
    (ASPP sums three 3x3 convolutions over 1280 non-negative ReLU6 channels: a large step moves
    every logit together; lr 2.5e-4 x10 already scored lower), which leaves the backbone
    nearly frozen in so few steps; one rate of 1e-3 for both trains the backbone and scored
    5 points higher.  Set ``head_lr_mult: 10, lr: 2.5e-4`` (and the paper's rates and crop) for
    the DeepLab-v2 recipe at VOC scale.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    epochs: int = Field(default=8, ge=1)
    batch_size: int = Field(default=16, ge=1)
    crop_size: int = Field(default=112, ge=8)
    #: Long side drawn uniformly from [low, high] before the crop (DeepLab's random scale,
    #: written like ``train.resize_long``): 120..160 is 1.25x..1.67x of the 96 px images.
    resize_long: tuple[int, int] = (120, 160)
    flip: bool = True
    lr: float = Field(default=1e-3, gt=0)
    #: The head's learning rate over the backbone's (DeepLab-v2: 10; see above why 1 here).
    head_lr_mult: float = Field(default=1.0, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=5e-4, ge=0)
    poly_power: float = Field(default=0.9, ge=0)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    precision: Precision = "fp32"
    #: Dilation rates of the ASPP branches, in feature-map pixels.  DeepLab-v2's [6, 12, 18, 24]
    #: were made for stride 8 on ~500 px images: 24 x 8 = 192 px, about 40 % of the image.  At
    #: stride 16 the maps here are 7x7 (crops) to 9x9 (inference), so a rate of 6 or more
    #: reaches only padding from most positions; [1, 2, 3] spans 16-48 px, up to a third of the
    #: enlarged image, about the paper's share.  Set [6, 12, 18, 24] for the paper's head at VOC
    #: scale.
    aspp_rates: list[int] = Field(default_factory=lambda: [1, 2, 3])
    #: Inference: softmax averaged over these scales (and mirrored inputs with ``infer_flip``).
    #: One pass at 1.5x by default, the middle of the training scales (see above).
    infer_scales: list[float] = Field(default_factory=lambda: [1.5])
    infer_flip: bool = False
    #: Dense-CRF post-processing of the averaged probabilities (needs the ``[crf]`` extra).
    crf: bool = False

    @field_validator("resize_long")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        return check_size_range(value)

    @field_validator("aspp_rates")
    @classmethod
    def _rates(cls, value: list[int]) -> list[int]:
        if not value or any(r < 1 for r in value):
            raise ValueError("must be a non-empty list of dilation rates >= 1")
        return value

    @field_validator("infer_scales")
    @classmethod
    def _scales(cls, value: list[float]) -> list[float]:
        if not value or any(not (MIN_SCALE <= s <= MAX_SCALE) for s in value):
            raise ValueError(f"must be a non-empty list of scales in [{MIN_SCALE}, {MAX_SCALE}]")
        return value


# -- the network ----------------------------------------------------------------------------------
class DeepLabASPP(nn.Module):
    """DeepLab-v2: a backbone and the v2 ASPP head (not v3's: no image pooling, no BN, no 1x1 fusion).

    The head is one 3x3 convolution per dilation rate from the backbone's ``out_channels`` to
    ``num_classes + 1`` logits (background first), the branch outputs summed, as DeepLab-v2's
    ASPP-L (and deeplab-pytorch's ``_ASPP``, which WSSS code bases train); weights ~ N(0, 0.01),
    biases 0.  ``forward(x)`` gives ``[N, C+1, ceil(H/stride), ceil(W/stride)]`` logits.

    ``backbone_spec`` (``{"name", "options"}``) is what :func:`load_segmentation` rebuilds the
    backbone from; :func:`build_segmentation` sets it.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, rates: Sequence[int] = (1, 2, 3),
                 init_seed: int = 0) -> None:
        super().__init__()
        if num_classes < 1:
            raise ConfigError(f"segmentation needs at least one foreground class, got {num_classes}")
        self.backbone = backbone
        channels = int(getattr(backbone, "out_channels"))
        self.stride = int(getattr(backbone, "stride"))
        self.rates = [int(r) for r in rates]
        self.aspp = nn.ModuleList(nn.Conv2d(channels, num_classes + 1, 3, padding=r, dilation=r, bias=True)
                                  for r in self.rates)
        # A private generator: the head's initial weights depend on init_seed alone, whatever
        # the global RNG has been used for (backbone construction, other models).
        gen = torch.Generator().manual_seed(int(init_seed))
        for conv in self.aspp:
            nn.init.normal_(conv.weight, 0.0, 0.01, generator=gen)
            nn.init.zeros_(conv.bias)
        self.backbone_spec: Optional[dict[str, Any]] = None
        #: The checkpoint metadata of a loaded model (:func:`load_segmentation`), else empty.
        self.meta: dict[str, Any] = {}

    @property
    def num_classes(self) -> int:
        """Foreground classes C (the logits have C + 1 channels)."""
        return self.aspp[0].out_channels - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, C+1, h, w]`` at the backbone's stride."""
        feats = self.backbone(x)
        out = self.aspp[0](feats)
        for conv in self.aspp[1:]:
            out = out + conv(feats)
        return out

    def train(self, mode: bool = True) -> "DeepLabASPP":
        """Set the mode; the backbone's own ``train`` runs, so a backbone that freezes BN keeps
        its BatchNorm layers in eval mode (as the classifier relies on)."""
        nn.Module.train(self, mode)  # calls backbone.train(mode), whose override freezes BN
        return self

    def param_groups(self, lr: float, head_lr_mult: float = 10.0) -> list[dict[str, Any]]:
        """SGD groups: trainable backbone parameters at ``lr``, the head at ``lr * head_lr_mult``
        (``initial_lr`` is kept for the poly schedule)."""
        groups = [
            {"params": [p for p in self.backbone.parameters() if p.requires_grad], "lr": lr, "initial_lr": lr},
            {"params": [p for p in self.aspp.parameters() if p.requires_grad], "lr": lr * head_lr_mult,
             "initial_lr": lr * head_lr_mult},
        ]
        return [g for g in groups if g["params"]]


def build_segmentation(backbone: str, backbone_options: dict[str, Any], num_classes: int,
                       options: SegmentOptions) -> DeepLabASPP:
    """Build the backbone plugin ``backbone`` and a DeepLab-v2 head for ``num_classes``.

    Seeds torch's global RNG with ``options.seed`` first, so randomly initialised backbones
    are reproducible too.
    """
    from ..components import create_backbone

    torch.manual_seed(derive_seed(options.seed, 1 << 21))
    net = create_backbone(backbone, **backbone_options)
    model = DeepLabASPP(net, num_classes, options.aspp_rates, init_seed=options.seed)
    model.backbone_spec = {"name": backbone, "options": dict(backbone_options)}
    return model


# -- pseudo masks ---------------------------------------------------------------------------------
def _read_pseudo_mask(path: Path, num_classes: int) -> np.ndarray:
    try:
        return read_mask(path, num_classes)
    except DataError as exc:  # a bad value or mode is a bad input of this stage, said as one line
        raise ConfigError(str(exc)) from None


def check_pseudo_masks(mask_dir: Path, dataset: VOCDataset) -> float:
    """Refuse a mask folder this stage cannot train on; return the share of labelled pixels.

    One line (:class:`DataError` from :func:`~wsss_bench.evaluation.masks.check_mask_dir`) for a
    missing folder or missing ``<id>.png`` of the split; one :class:`ConfigError` line for a mask
    whose size differs from its image, values above C other than 255, and a folder without a
    single labelled (non-255) pixel.
    """
    mask_dir = Path(mask_dir)
    check_mask_dir(mask_dir, dataset)   # the folder and one <id>.png per image, as scoring wants
    labelled = total = 0
    for image_id in dataset.ids:
        path = mask_dir / f"{image_id}.png"
        mask = _read_pseudo_mask(path, dataset.num_classes)
        width, height = dataset.image_size(image_id)
        if mask.shape != (height, width):
            raise ConfigError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is {width}x{height}")
        labelled += int((mask != IGNORE_INDEX).sum())
        total += mask.size
    if labelled == 0:
        raise ConfigError(f"{mask_dir}: the {len(dataset.ids)} masks of split {dataset.split!r} have no "
                          "labelled pixel (all 255, unsure): nothing to train on")
    return labelled / total


class _Crops:
    """Training crops of one split: image ``[3, S, S]`` float32 and labels ``[S, S]`` int64."""

    def __init__(self, dataset: VOCDataset, mask_dir: Path, options: SegmentOptions) -> None:
        self.dataset = dataset
        self.mask_dir = Path(mask_dir)
        self.options = options

    def __len__(self) -> int:
        return len(self.dataset.ids)

    def sample(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        opts = self.options
        image_id = self.dataset.ids[index]
        # As the classifier: the draws depend on (seed, epoch, index) only, so a resumed run
        # sees the crops an uninterrupted one would.
        rng = random.Random(derive_seed(opts.seed, epoch, index))
        image = self.dataset.load_image(image_id)
        mask = Image.fromarray(_read_pseudo_mask(self.mask_dir / f"{image_id}.png", self.dataset.num_classes))
        image = random_resize_long(image, opts.resize_long[0], opts.resize_long[1], rng)
        mask = mask.resize(image.size, Image.NEAREST)  # labels are never interpolated
        if rng.random() < 0.5 and opts.flip:
            image, mask = image.transpose(Image.FLIP_LEFT_RIGHT), mask.transpose(Image.FLIP_LEFT_RIGHT)
        # One crop of image and labels together: label + 1 rides as a fourth channel, so the
        # zero padding of random_crop (the mean colour for the image) becomes -1 -> 255 (ignored).
        stacked = np.concatenate([normalize(image), np.asarray(mask, np.float32)[..., None] + 1], axis=2)
        crop = random_crop(stacked, opts.crop_size, rng)
        labels = crop[..., 3].astype(np.int64) - 1
        labels[labels < 0] = IGNORE_INDEX
        return np.ascontiguousarray(crop[..., :3].transpose(2, 0, 1)), labels

    def batch(self, items: list[tuple[int, int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [self.sample(epoch, index) for epoch, index in items]
        # contiguous(): conv backward on permuted (channels-last strided) batches corrupts the
        # heap with torch 2.14.1 on CPU; the arrays above are already C-ordered, this is a guard.
        images = torch.from_numpy(np.stack([p[0] for p in pairs])).contiguous().to(device)
        labels = torch.from_numpy(np.stack([p[1] for p in pairs])).contiguous().to(device)
        return images, labels


# -- training -------------------------------------------------------------------------------------
def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labelled pixels (255 ignored) of logits ``[N, C+1, h, w]``.

    The logits are upsampled bilinearly (``align_corners=False``) to the labels' ``[N, H, W]``
    first.  A batch without any labelled pixel gives a loss of 0 and no gradient (PyTorch's
    mean reduction would give NaN: 0 / 0).
    """
    logits = logits.float()
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    total = F.cross_entropy(logits, labels.long(), ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


@dataclass
class SegmentTrainReport:
    """What :func:`train_segmentation` reports."""

    seconds: float = 0.0
    epoch_losses: list[float] = field(default_factory=list)
    images: int = 0
    #: Share of the pseudo masks' pixels that carry a label (not 255).
    pixels_labelled: float = 0.0
    steps: int = 0
    #: The epoch training resumed after (0: started from scratch).
    resumed_epochs: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def train_segmentation(model: DeepLabASPP, dataset: VOCDataset, mask_dir: Path, options: SegmentOptions,
                       device: torch.device, show_progress: bool = True, state_file: Optional[Path] = None,
                       state_key: Optional[str] = None) -> SegmentTrainReport:
    """Train ``model`` in place on ``dataset``'s images and the pseudo masks ``mask_dir/<id>.png``.

    The masks are checked first (:func:`check_pseudo_masks`).  With ``state_file`` the
    training state (weights, optimizer, epoch, step, losses) is saved atomically after every
    epoch and picked up when it exists with the same ``state_key``: a killed run continues at
    its last finished epoch and ends with the weights of an uninterrupted run.  A NaN or
    infinite loss (or weights) raises :class:`~wsss_bench.engine.train.TrainingDiverged` and
    removes the state file.
    """
    if model.num_classes != dataset.num_classes:
        raise ConfigError(f"the model predicts {model.num_classes} classes but split {dataset.split!r} "
                          f"has {dataset.num_classes}")
    share = check_pseudo_masks(mask_dir, dataset)
    crops = _Crops(dataset, mask_dir, options)
    seed = options.seed
    steps_per_epoch = len(epoch_batches(len(crops), options.batch_size, seed, 0))
    max_step = max(1, steps_per_epoch * options.epochs)
    optimizer = torch.optim.SGD(model.param_groups(options.lr, options.head_lr_mult), lr=options.lr,
                                momentum=options.momentum, weight_decay=options.weight_decay)
    model.to(device).train()
    report = SegmentTrainReport(images=len(crops), pixels_labelled=share)
    key = state_key or ""
    first_epoch, step = 0, 0
    resumed = _load_state(state_file, key, model, optimizer)
    if resumed is not None:
        first_epoch, step, report.epoch_losses = resumed
        report.resumed_epochs = first_epoch
        model.to(device).train()
    start = time.perf_counter()
    for epoch in range(first_epoch, options.epochs):
        batches = epoch_batches(len(crops), options.batch_size, seed, epoch)
        epoch_start, total = time.perf_counter(), 0.0
        for items in progress_bar(batches, f"segment epoch {epoch + 1}/{options.epochs}", show_progress,
                                  total=len(batches), summary=False):
            images, labels = crops.batch(items, device)
            for group in optimizer.param_groups:
                group["lr"] = poly_lr(group["initial_lr"], step, max_step, options.poly_power)
            torch.manual_seed(derive_seed(seed, 1 << 20, step))  # dropout in a backbone: per step only
            with autocast(device, options.precision):
                logits = model(images)
            loss = segmentation_loss(logits, labels)  # upsampling and the loss in fp32
            number = float(loss.detach())
            if not math.isfinite(number):
                raise _diverged(options, state_file, f"epoch {epoch + 1}, step {step + 1} (loss {number})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            total += number
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            raise _diverged(options, state_file, f"epoch {epoch + 1} (the weights became NaN or infinite)")
        report.epoch_losses.append(total / max(1, len(batches)))
        if show_progress and not on_terminal():
            elapsed = time.perf_counter() - epoch_start
            rate = len(batches) * options.batch_size / elapsed if elapsed > 0 else 0.0
            _log.info(epoch_line("segment", epoch + 1, options.epochs, {"ce": report.epoch_losses[-1]},
                                 rate, elapsed * (options.epochs - epoch - 1)))
        if state_file is not None:
            _save_state(state_file, key, model, optimizer, epoch + 1, step, report.epoch_losses)
    report.steps = step
    report.seconds = time.perf_counter() - start
    model.eval()
    return report


def _diverged(options: SegmentOptions, state_file: Optional[Path], where: str) -> TrainingDiverged:
    """The error of a diverged training, after removing its resume state (resuming it would
    only diverge again)."""
    if state_file is not None:
        Path(state_file).unlink(missing_ok=True)
    return TrainingDiverged(f"segment: training diverged at {where}; lower segment.options.lr (now "
                            f"{options.lr}) or segment.options.head_lr_mult (now {options.head_lr_mult})")


def _save_state(path: Path, key: str, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
                step: int, losses: list[float]) -> None:
    # The checkpoint format (checksummed weights) with the rest in its metadata: read back
    # through checkpoints.read_checkpoint, weights_only like every file we load.
    save_checkpoint(path, model, {"kind": _STATE_KIND, "key": key, "epoch": epoch, "step": step,
                                  "losses": list(losses), "optimizer": optimizer.state_dict()})


def _load_state(path: Optional[Path], key: str, model: nn.Module, optimizer: torch.optim.Optimizer
                ) -> Optional[tuple[int, int, list[float]]]:
    """Restore a saved state of the same training; ``None`` when there is none (or it is damaged,
    which only costs the epochs it held)."""
    if path is None or not Path(path).is_file():
        return None
    try:
        saved = read_checkpoint(Path(path))
    except UserError:
        return None
    meta = saved["meta"]
    if meta.get("kind") != _STATE_KIND or meta.get("key") != key:
        return None
    try:
        model.load_state_dict(saved["state_dict"], strict=True)
        optimizer.load_state_dict(meta["optimizer"])
    except (RuntimeError, KeyError, ValueError):  # another model's state under the same name
        return None
    return int(meta["epoch"]), int(meta["step"]), [float(v) for v in meta["losses"]]


# -- inference ------------------------------------------------------------------------------------
def _input(image: Image.Image, scale: float, flip: bool) -> torch.Tensor:
    arr = normalize(resize_by_scale(image, scale))
    x = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).unsqueeze(0)
    return torch.cat([x, x.flip(-1)]).contiguous() if flip else x


@torch.inference_mode()
def predict_probs(model: DeepLabASPP, image: Image.Image, options: SegmentOptions,
                  device: torch.device) -> np.ndarray:
    """Class probabilities ``[C+1, H, W]`` of one image: the softmax of the logits upsampled to
    the image size, averaged over ``infer_scales`` (and mirrored inputs with ``infer_flip``)."""
    width, height = image.size
    total: Optional[torch.Tensor] = None
    count = 0
    with autocast(device, options.precision):
        for scale in options.infer_scales:
            logits = model(_input(image, scale, options.infer_flip).to(device))
            with torch.autocast(device_type=device.type, enabled=False):
                logits = F.interpolate(logits.float(), size=(height, width), mode="bilinear",
                                       align_corners=False)
                probs = logits.softmax(dim=1)
                fused = probs[0] + probs[1].flip(-1) if options.infer_flip else probs[0]
            total = fused if total is None else total + fused
            count += 2 if options.infer_flip else 1
    assert total is not None
    return (total / count).cpu().numpy()


def crf_function() -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """``dense_crf(image_uint8 [H, W, 3], probs [n, H, W]) -> marginals``, or the one-line
    :class:`ConfigError` naming the ``[crf]`` extra when pydensecrf is missing (call it before
    training, so a missing extra does not cost a training)."""
    # Imported here only: the CRF is an optional extra, and nothing else needs the module.
    from . import dense_crf as crf

    crf.require_crf()
    return crf.dense_crf


def predict_split(model: DeepLabASPP, dataset: VOCDataset, out_dir: Path, options: SegmentOptions,
                  device: torch.device, show_progress: bool = True) -> int:
    """Write the label map of every image of ``dataset`` as ``out_dir/<id>.png``; return how many.

    Per image: :func:`predict_probs`, the dense CRF when ``options.crf``, argmax; each file a
    single-channel VOC-palette PNG (0 background, ``1..C``) written atomically, the format of the
    pseudo masks, so ``wsss eval --masks out_dir`` scores it.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    crf = crf_function() if options.crf else None  # before any file: a missing extra is one line
    model.to(device).eval()
    written = 0
    for image_id in progress_bar(dataset.ids, f"segment {dataset.split}", show_progress):
        image = dataset.load_image(image_id)
        probs = predict_probs(model, image, options, device)
        if crf is not None:
            probs = crf(np.asarray(image, np.uint8), probs.astype(np.float32))
        labels = np.asarray(probs).argmax(axis=0).astype(np.uint8)
        io.write_bytes(out_dir / f"{image_id}.png", palette_png_bytes(labels))
        written += 1
    return written


# -- checkpoints ----------------------------------------------------------------------------------
def save_segmentation(path: Path, model: DeepLabASPP, meta: Optional[dict[str, Any]] = None) -> None:
    """Atomically save ``model`` (checkpoint format, checksummed) with what rebuilds it.

    The metadata holds ``kind: "segmentation"``, the backbone (``{"name", "options"}``: the
    model's ``backbone_spec`` unless ``meta`` gives ``backbone``), ``num_classes``, the ASPP
    ``aspp_rates``, and whatever else ``meta`` holds (e.g. ``options``, the training report).
    """
    meta = dict(meta or {})
    backbone = meta.pop("backbone", None) or model.backbone_spec
    if not backbone or "name" not in backbone:
        raise ConfigError("save_segmentation: the backbone is unknown; build the model with "
                          "build_segmentation or pass meta={'backbone': {'name': ..., 'options': ...}}")
    save_checkpoint(Path(path), model, {**meta, "kind": KIND,
                                        "backbone": {"name": backbone["name"],
                                                     "options": dict(backbone.get("options") or {})},
                                        "num_classes": model.num_classes, "aspp_rates": list(model.rates)})


def _without_pretrained(options: dict[str, Any]) -> dict[str, Any]:
    # The checkpoint replaces the initial weights: never read or fetch them again (the file
    # may be gone, a hub download may be impossible).  bool flags (efficientnet_lite, timm)
    # become False, weight paths (resnet38d) None.
    out = dict(options)
    if "pretrained" in out:
        out["pretrained"] = False if isinstance(out["pretrained"], bool) else None
    return out


def load_segmentation(path: Path) -> DeepLabASPP:
    """The :class:`DeepLabASPP` saved by :func:`save_segmentation` (on the CPU, in eval mode).

    The backbone is rebuilt from the file's metadata and the weights load strictly; the
    metadata stays on the model as ``model.meta``.
    """
    from ..components import create_backbone

    saved = read_checkpoint(Path(path))
    meta = saved["meta"]
    if meta.get("kind") != KIND:
        raise WeightsError(f"{path}: not a segmentation checkpoint (written by `wsss segment`); "
                           f"kind {meta.get('kind')!r}")
    spec = meta.get("backbone") or {}
    try:
        name, options = str(spec["name"]), dict(spec.get("options") or {})
        num_classes, rates = int(meta["num_classes"]), [int(r) for r in meta["aspp_rates"]]
    except (KeyError, TypeError, ValueError):
        raise WeightsError(f"{path}: segmentation checkpoint without its backbone, classes or rates") from None
    model = DeepLabASPP(create_backbone(name, **_without_pretrained(options)), num_classes, rates)
    try:
        model.load_state_dict(saved["state_dict"], strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsError(f"{path}: weights do not fit backbone {name!r} with {num_classes} classes "
                           f"({first[:300]})") from None
    model.backbone_spec = {"name": name, "options": options}
    model.meta = meta
    return model.eval()

