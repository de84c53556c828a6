"""Multi-scale, flipped CAM inference (``sccam-method.md`` section 5.1).

Per image: for each scale the bicubic-resized image and its mirror run as one batch of two,
ReLU CAMs of the ground-truth classes are upsampled bilinearly to full resolution, the mirrored
map is flipped back, everything is summed, and each class is divided by its max + 1e-5.
Only the ground-truth channels are upsampled: the others are zeroed by the original code anyway.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..data.transforms import normalize, resize_by_scale
from ..data.voc import VOCDataset
from ..device import autocast
from ..evaluation.camfiles import write_cam
from ..progress import progress_bar
from .model import PARENT, SUB, Classifier

EPS = 1e-5

#: ``cam_fn(model, x, channels) -> [B, len(channels), h, w]`` non-negative maps for a batch.
CamFunction = Callable[[Classifier, torch.Tensor, torch.Tensor], torch.Tensor]


def head_cams(head: str = PARENT) -> CamFunction:
    """The classic CAM: ReLU of the head weights applied to the final feature map."""

    def cam_fn(model: Classifier, x: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
        return model.cams(x, head).index_select(1, channels)

    return cam_fn


def _input_batch(image: Image.Image, scale: float, flip: bool) -> torch.Tensor:
    arr = normalize(resize_by_scale(image, scale))
    x = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).unsqueeze(0)
    return torch.cat([x, x.flip(-1)]) if flip else x


def sub_channels(class_ids: Sequence[int], k: int) -> list[int]:
    """Sub-category channel indices of the given parents (parent·K + j)."""
    return [c * k + j for c in class_ids for j in range(k)]


def image_cams(model: Classifier, image: Image.Image, class_ids: Sequence[int],
               scales: Sequence[float], flip: bool, device: torch.device,
               head: str = PARENT, cam_fn: Optional[CamFunction] = None,
               precision: str = "fp32") -> np.ndarray:
    """Normalised CAMs ``[len(class_ids), H, W]`` of one image.

    With ``head="sub"`` each parent's K sub-category maps are normalised by their joint max
    and merged by a pixel-wise max (the "cls200" diagnostic map of SC-CAM).  ``cam_fn``
    replaces the head-weight CAM (post-hoc methods such as Grad-CAM); gradient-based ones
    manage autograd themselves, so inference mode is only entered for the default.
    """
    if cam_fn is None:
        with torch.inference_mode():
            return image_cams(model, image, class_ids, scales, flip, device, head, head_cams(head),
                              precision)
    width, height = image.size
    n = len(class_ids)
    if n == 0:
        return np.zeros((0, height, width), np.float32)
    k = 1
    channels = list(class_ids)
    if head == SUB:
        k = model.heads[SUB].out_channels // model.num_classes
        channels = sub_channels(class_ids, k)
    index = torch.tensor(channels, device=device)
    total: Optional[torch.Tensor] = None
    # One autocast region for all scales: autocast caches the low-precision copy of each weight
    # until its outermost region exits, so per-scale regions would re-cast every weight 4 times.
    with autocast(device, precision):
        for scale in scales:
            x = _input_batch(image, scale, flip).to(device)
            cam = cam_fn(model, x, index).detach().float()
            # Upsampling, fusion and normalisation stay in fp32 whatever the forward dtype.
            # (A nested disabled region keeps the outer region's weight cache.)
            with torch.autocast(device_type=device.type, enabled=False):
                cam = F.interpolate(cam, size=(height, width), mode="bilinear", align_corners=False)
                fused = cam[0] + cam[1].flip(-1) if flip else cam[0]
            total = fused if total is None else total + fused
    assert total is not None
    total = total.view(n, k, height, width)
    peak = total.amax(dim=(1, 2, 3), keepdim=True)
    maps = (total / (peak + EPS)).amax(dim=1)
    return maps.float().cpu().numpy()


def shard_ids(ids: Sequence[str], rank: int = 0, world_size: int = 1) -> list[str]:
    """The ids one of ``world_size`` processes handles: every ``world_size``-th from ``rank``.

    Strided rather than blocked so that shards stay balanced when image sizes drift along the
    list (VOC ids are sorted by year).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad shard rank {rank} of {world_size}")
    return list(ids)[rank::world_size]


def infer_split(model: Classifier, dataset: VOCDataset, out_dir: Path, scales: Sequence[float],
                flip: bool, device: torch.device, head: str = PARENT,
                show_progress: bool = False, skip_existing: bool = True,
                cam_fn: Optional[CamFunction] = None, precision: str = "fp32",
                rank: int = 0, world_size: int = 1) -> int:
    """Write ``<id>.npz`` CAM files for every image of ``dataset``; returns how many were new.

    With ``world_size > 1`` only this process's shard (:func:`shard_ids`) is written; every
    file depends on its image alone, so the union of the shards equals a single-process run.
    Decoding the next image and compressing the previous maps run in a helper thread while the
    model computes (PIL and zlib release the GIL).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(device).eval()
    todo = [i for i in shard_ids(dataset.ids, rank, world_size)
            if not (skip_existing and (out_dir / f"{i}.npz").is_file())]
    if not todo:
        return 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cam-io") as io_pool, \
            autocast(device, precision):  # one region for the split: weights are cast once
        pending_write: Optional[Future] = None
        next_image = io_pool.submit(dataset.load_image, todo[0])
        for pos, image_id in enumerate(progress_bar(todo, f"cams {dataset.split}", show_progress)):
            image = next_image.result()
            if pos + 1 < len(todo):
                next_image = io_pool.submit(dataset.load_image, todo[pos + 1])
            keys = np.flatnonzero(dataset.label(image_id))
            cams = image_cams(model, image, keys.tolist(), scales, flip, device, head, cam_fn,
                              precision)
            if pending_write is not None:
                pending_write.result()  # surface write errors in order, keep one write in flight
            pending_write = io_pool.submit(write_cam, out_dir / f"{image_id}.npz", keys, cams)
        if pending_write is not None:
            pending_write.result()
    return len(todo)


@torch.inference_mode()
def extract_features(model: Classifier, dataset: VOCDataset, device: torch.device,
                     show_progress: bool = False) -> np.ndarray:
    """SC-CAM's clustering features: GAP of the final map at scale 1.0, unflipped ``[N, D]``."""
    model.to(device).eval()
    rows = []
    for image_id in progress_bar(dataset.ids, f"features {dataset.split}", show_progress):
        x = _input_batch(dataset.load_image(image_id), 1.0, flip=False).to(device)
        rows.append(model.pooled_features(x).float().cpu().numpy()[0])
    return np.stack(rows).astype(np.float32)
