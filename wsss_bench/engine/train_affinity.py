"""Training AffinityNet on CAMs (PSA's ``train_aff.py``), its labels through PSA's dense CRF.

Labels (PSA's ``infer_cls.py`` + ``VOC12AffDataset`` / ``ExtractAffinityLabelInRadius``): from a
CAM file's maps two score stacks ``[(1 - max)^fg_alpha, cams]`` (alpha 4: confident foreground)
and ``[(1 - max)^bg_alpha, cams]`` (alpha 32: confident background) are made at the image's full
size and, when the CRF is used, each passes through the dense CRF on the image
(:func:`~wsss_bench.engine.dense_crf.dense_crf`, PSA's ``crf_inference`` parameters; PSA's
``la_crf`` / ``ha_crf`` maps), once per image before training.  Each training crop cuts both
stacks with the image; they are average-pooled to the feature stride and arg-maxed: a pixel is
its class where the first stack's winner is a class, background where the second's winner is the
background, unsure (255) otherwise and where no score reaches 1e-5 (the crop's zero padding,
as PSA).  ``crf``: ``auto`` uses the CRF when the ``[crf]`` extra (pydensecrf) is installed,
``on`` requires it, ``off`` uses the raw stacks; :class:`AffinityLog` says which (``crf: used``
or ``absent``, stated by every refined row).

Pairs within ``radius`` on the stride map (:func:`~wsss_bench.engine.random_walk.pair_indices`)
are background pairs (both background), foreground pairs (the same class) and negative pairs
(different labels, both sure).  Loss: ``bg/4 + fg/4 + neg/2`` of ``-log(aff)`` and
``-log(1 - aff)`` averaged over each set, as PSA.  SGD with a poly schedule, the head at ten
times the backbone's learning rate (PSA's x1 / x10 weight groups; PSA's code passes its weight
decay as the momentum argument, an accident not reproduced here: momentum is an option).
"""
from __future__ import annotations

import logging
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image

from ..data.transforms import normalize
from ..data.voc import IGNORE_INDEX, VOCDataset
from ..errors import ConfigError
from ..evaluation.camfiles import check_cam_dir, read_cam
from ..progress import progress_bar
from .affinity_net import HEAD_NAMES, AffinityNet
from .dense_crf import CRF_EXTRA_MESSAGE, crf_available, dense_crf
from .random_walk import PairIndex, batch_pair_affinity, pair_indices, pool_cams, with_background
from .train import TrainingDiverged

log = logging.getLogger("wsss_bench")


@dataclass
class AffinityTraining:
    """Settings of :func:`train_affinity` (defaults scaled to CPU runs; PSA: 8 epochs, crop 448,
    batch 8, lr 0.1)."""

    epochs: int = 3
    batch_size: int = 8
    crop_size: int = 160
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    fg_alpha: float = 4.0
    bg_alpha: float = 32.0
    radius: int = 5
    seed: int = 0
    #: dense CRF on the label stacks: "auto" (when pydensecrf imports), "on" or "off"
    crf: str = "auto"


CRF_SETTINGS = ("auto", "on", "off")


def crf_used(setting: str) -> bool:
    """Whether the ``crf`` setting runs the CRF here; ``on`` without pydensecrf is one line."""
    if setting not in CRF_SETTINGS:
        raise ConfigError(f"affinity training crf={setting!r}: one of {', '.join(CRF_SETTINGS)}")
    if setting == "off":
        return False
    available = crf_available()
    if setting == "on" and not available:
        raise ConfigError(f"affinity training crf=on: {CRF_EXTRA_MESSAGE} (or crf: auto / off)")
    return available


#: Below this no stack scores: the crop's padding (PSA's ``no_score_region``).
NO_SCORE = 1e-5


def label_scores(cams: np.ndarray, fg_alpha: float = 4.0, bg_alpha: float = 32.0,
                 image: Optional[Union[np.ndarray, Image.Image]] = None) -> np.ndarray:
    """float32 ``[2, 1 + n, H, W]``: the stacks ``[(1 - max)^alpha, cams]`` for ``fg_alpha`` and
    ``bg_alpha``, each through the dense CRF on ``image`` (uint8 RGB ``[H, W, 3]``) when given."""
    maps = torch.as_tensor(np.asarray(cams, np.float32))
    stacks = [with_background(maps, alpha).numpy() for alpha in (fg_alpha, bg_alpha)]
    if image is not None:
        pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, np.uint8)
        # PSA's la_crf / ha_crf: the full image, before any crop or pooling
        stacks = [dense_crf(pixels, stack) for stack in stacks]
    return np.stack(stacks).astype(np.float32)


def labels_from_scores(scores: np.ndarray, keys: np.ndarray, stride: int) -> np.ndarray:
    """uint8 labels on the stride map of :func:`label_scores` stacks (see module): class
    ``key + 1``, background 0, unsure 255."""
    stacks = torch.as_tensor(np.asarray(scores, np.float32))
    two, depth = stacks.shape[:2]
    pooled = pool_cams(stacks.reshape(two * depth, *stacks.shape[2:]), stride)
    no_score = pooled.max(dim=0).values < NO_SCORE
    fg, bg = pooled.reshape(two, depth, *pooled.shape[1:]).argmax(dim=1)
    lookup = torch.as_tensor(np.concatenate([[0], np.asarray(keys, np.int64) + 1]))
    labels = torch.where(fg == 0, torch.full_like(fg, IGNORE_INDEX), lookup[fg])
    labels = torch.where(bg == 0, torch.zeros_like(labels), labels)
    labels = torch.where(no_score, torch.full_like(labels, IGNORE_INDEX), labels)
    return labels.numpy().astype(np.uint8)


def confident_labels(cams: np.ndarray, keys: np.ndarray, stride: int, fg_alpha: float = 4.0,
                     bg_alpha: float = 32.0, image: Optional[Union[np.ndarray, Image.Image]] = None) -> np.ndarray:
    """uint8 labels on the stride map of a whole image's CAMs: class ``key + 1``, background 0,
    unsure 255 (see module); through the dense CRF on ``image`` when given."""
    return labels_from_scores(label_scores(cams, fg_alpha, bg_alpha, image), keys, stride)


def pair_label_sets(labels: torch.Tensor, pairs: PairIndex) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Background, foreground and negative pair masks ``[B, P]`` of stride-map labels ``[B, h, w]``."""
    flat = labels.reshape(labels.shape[0], -1)
    a, b = flat[:, pairs.source], flat[:, pairs.target]
    sure = (a != IGNORE_INDEX) & (b != IGNORE_INDEX)
    same = (a == b) & sure
    return same & (a == 0), same & (a != 0), ~(a == b) & sure


def affinity_loss(features: torch.Tensor, labels: torch.Tensor, pairs: PairIndex) -> torch.Tensor:
    """PSA's ``bg/4 + fg/4 + neg/2`` for a batch of features ``[B, C, h, w]`` and labels ``[B, h, w]``."""
    aff = batch_pair_affinity(features, pairs)                                      # [B, P]
    bg, fg, neg = (m.to(aff.dtype) for m in pair_label_sets(labels.to(aff.device), pairs))
    eps = 1e-5
    bg_loss = (-bg * torch.log(aff + eps)).sum() / (bg.sum() + eps)
    fg_loss = (-fg * torch.log(aff + eps)).sum() / (fg.sum() + eps)
    neg_loss = (-neg * torch.log(1.0 + eps - aff)).sum() / (neg.sum() + eps)
    return bg_loss / 4 + fg_loss / 4 + neg_loss / 2


@dataclass
class _Sample:
    """One training image: its id and keys, and where its label score stacks lie on disk."""

    image_id: str
    keys: np.ndarray
    scores: Path                # label_scores, float32 [2, 1 + n, H, W] as .npy


def _crop_pair(image: np.ndarray, scores: np.ndarray, size: int,
               rng: random.Random) -> tuple[np.ndarray, np.ndarray]:
    """A random ``size`` crop of a normalised image ``[H, W, 3]`` and its score stacks (zero
    padding: the mean colour, no score), flipped half the time."""
    h, w = image.shape[:2]
    ch, cw = max(size, h), max(size, w)
    padded = np.zeros((ch, cw, 3), np.float32)
    maps = np.zeros((*scores.shape[:-2], ch, cw), np.float32)
    oy, ox = rng.randint(0, ch - h), rng.randint(0, cw - w)
    padded[oy:oy + h, ox:ox + w] = image
    maps[..., oy:oy + h, ox:ox + w] = scores
    image = padded
    y, x = rng.randint(0, ch - size), rng.randint(0, cw - size)
    image, maps = image[y:y + size, x:x + size], maps[..., y:y + size, x:x + size]
    if rng.random() < 0.5:
        image, maps = image[:, ::-1], maps[..., ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(maps)


@dataclass
class AffinityLog:
    """What :func:`train_affinity` reports."""

    epoch_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    #: "used" when the labels went through the dense CRF, else "absent"
    crf: str = "absent"
    #: the CRF's time (once per image, before training; not part of ``seconds``)
    crf_seconds: float = 0.0


def train_affinity(model: AffinityNet, dataset: VOCDataset, cam_dir: Path, settings: AffinityTraining,
                   device: torch.device, show_progress: bool = False,
                   scratch: Optional[Path] = None) -> AffinityLog:
    """Train ``model`` in place on ``dataset``'s images and the CAM files of ``cam_dir``.

    The label score stacks of every image are computed once (through the CRF, the slow part)
    and kept as ``.npy`` files in a temporary folder under ``scratch`` (the system's temporary
    folder when None), removed afterwards; images are read per batch.  Held in memory, the
    stacks and images of PASCAL VOC's train_aug would take some 70 GB.
    """
    cam_dir = Path(cam_dir)
    check_cam_dir(cam_dir, dataset.ids, dataset.split)
    stride = model.stride  # the settings' errors come before the CRF's minutes
    if settings.crop_size % stride:
        raise ConfigError(f"affinity crop size {settings.crop_size} is not a multiple of the stride {stride}")
    pairs = pair_indices(settings.radius, (settings.crop_size // stride, settings.crop_size // stride))
    if pairs.source.numel() == 0:
        smallest = (2 * settings.radius - 1) * stride
        raise ConfigError(f"affinity crop size {settings.crop_size} gives a {settings.crop_size // stride}-pixel "
                          f"map, too small for pairs within radius {settings.radius}: use at least {smallest}")
    use_crf = crf_used(settings.crf)
    report = AffinityLog(crf="used" if use_crf else "absent")
    if scratch is not None:
        Path(scratch).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".train-aff-labels-", dir=scratch) as folder:
        labelling = time.perf_counter()
        samples = _write_label_scores(dataset, cam_dir, settings, use_crf, Path(folder), show_progress)
        if use_crf:
            report.crf_seconds = time.perf_counter() - labelling
            log.info("train-aff: CRF labels of %d images in %.1f s", len(samples), report.crf_seconds)
        _fit(model, dataset, samples, pairs, settings, device, show_progress, report)
    return report


def _write_label_scores(dataset: VOCDataset, cam_dir: Path, settings: AffinityTraining, use_crf: bool,
                        folder: Path, show_progress: bool) -> list[_Sample]:
    """Each image's :func:`label_scores` stacks saved to ``folder``; the samples that find them."""
    samples = []
    # The CRF runs once per image here (PSA runs it offline in infer_cls.py and keeps its
    # la_crf / ha_crf folders on disk): two CRFs of a 500x375 image take seconds, so the bar is
    # shown for it.
    for index, image_id in enumerate(progress_bar(dataset.ids, "train-aff labels (CRF)", show_progress and use_crf)):
        image: Image.Image = dataset.load_image(image_id)
        keys, cams = read_cam(cam_dir / f"{image_id}.npz", dataset.num_classes, (image.size[1], image.size[0]))
        scores = label_scores(cams, settings.fg_alpha, settings.bg_alpha, image if use_crf else None)
        path = folder / f"{index}.npy"    # numbered: an image id may hold characters a file name cannot
        np.save(path, scores, allow_pickle=False)
        samples.append(_Sample(image_id, keys, path))
    return samples


def _fit(model: AffinityNet, dataset: VOCDataset, samples: list[_Sample], pairs: PairIndex,
         settings: AffinityTraining, device: torch.device, show_progress: bool, report: AffinityLog) -> None:
    """The training loop of :func:`train_affinity` (SGD, poly schedule, PSA's loss)."""
    stride = model.stride
    head = [p for n, p in model.named_parameters() if n.split(".")[0] in (*HEAD_NAMES, "f9")]
    head_ids = {id(p) for p in head}
    trunk = [p for p in model.parameters() if id(p) not in head_ids and p.requires_grad]
    optimizer = torch.optim.SGD([{"params": trunk, "lr": settings.lr}, {"params": head, "lr": 10 * settings.lr}],
                                lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    steps_per_epoch = max(1, len(samples) // settings.batch_size)
    total = steps_per_epoch * settings.epochs
    rng = random.Random(settings.seed)
    torch.manual_seed(settings.seed)
    model.to(device).train()
    started = time.perf_counter()
    step = 0
    for epoch in range(settings.epochs):
        order = list(range(len(samples)))
        rng.shuffle(order)
        losses = []
        for index in progress_bar(range(steps_per_epoch), f"train-aff epoch {epoch + 1}", show_progress):
            batch = [samples[i] for i in order[index * settings.batch_size:(index + 1) * settings.batch_size]]
            crops = [(*_crop_pair(normalize(dataset.load_image(s.image_id)),
                                  np.load(s.scores, mmap_mode="r", allow_pickle=False), settings.crop_size, rng),
                      s.keys) for s in batch]
            # contiguous(): conv backward on the permuted (channels-last strided) batch corrupted
            # the heap with torch 2.14.1 on CPU ("free(): invalid next size").
            images = torch.from_numpy(np.stack([c[0] for c in crops])).permute(0, 3, 1, 2).contiguous().to(device)
            labels = torch.from_numpy(np.stack([labels_from_scores(c[1], c[2], stride) for c in crops]))
            factor = (1 - step / total) ** 0.9
            optimizer.param_groups[0]["lr"] = settings.lr * factor
            optimizer.param_groups[1]["lr"] = 10 * settings.lr * factor
            loss = affinity_loss(model(images), labels, pairs)
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"AffinityNet training diverged at epoch {epoch + 1} (loss {loss.item()}); "
                                    f"lower refine.options.train.lr (now {settings.lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach().item())
            step += 1
        report.epoch_losses.append(float(np.mean(losses)) if losses else float("nan"))
        log.info("train-aff epoch %d/%d: loss %.4f", epoch + 1, settings.epochs, report.epoch_losses[-1])
    report.seconds = time.perf_counter() - started
    model.eval()
