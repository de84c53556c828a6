"""Image transforms of the PSA/SC-CAM recipe, written so CPU and GPU runs see the same pixels."""
from __future__ import annotations

import random
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import ColorJitter

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def normalize(img: Image.Image) -> np.ndarray:
    """RGB PIL image → float32 ``[H, W, 3]`` normalised with the ImageNet mean and std."""
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return (arr - IMAGENET_MEAN) / IMAGENET_STD


def resize_by_scale(img: Image.Image, scale: float) -> Image.Image:
    """Bicubic resize to ``(round(W*s), round(H*s))``, as SC-CAM's multi-scale inference."""
    if scale == 1.0:
        return img
    w, h = img.size
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)


def random_resize_long(img: Image.Image, low: int, high: int, rng: random.Random) -> Image.Image:
    """Resize so the long side is a uniform random integer in ``[low, high]``, keeping aspect."""
    target = rng.randint(low, high)
    w, h = img.size
    scale = target / max(w, h)
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)


def random_crop(arr: np.ndarray, size: int, rng: random.Random) -> np.ndarray:
    """A ``size``×``size`` crop of ``[H, W, C]``; short sides are placed in a zero canvas.

    Zero means the mean colour, because this runs after normalisation (PSA's behaviour).
    """
    h, w = arr.shape[:2]
    out = np.zeros((size, size, arr.shape[2]), arr.dtype)

    def offsets(length: int) -> tuple[int, int, int]:
        space = length - size
        if space > 0:
            return 0, rng.randrange(space + 1), size
        return rng.randrange(-space + 1), 0, length

    cont_top, img_top, ch = offsets(h)
    cont_left, img_left, cw = offsets(w)
    out[cont_top:cont_top + ch, cont_left:cont_left + cw] = \
        arr[img_top:img_top + ch, img_left:img_left + cw]
    return out


class TrainTransform:
    """Long-side resize, flip, colour jitter, normalise, crop (``sccam-method.md`` 3.1)."""

    def __init__(self, resize_long: Sequence[int], crop_size: int,
                 color_jitter: Sequence[float]) -> None:
        self.low, self.high = int(resize_long[0]), int(resize_long[1])
        self.crop_size = crop_size
        b, c, s, hue = color_jitter
        self.jitter = ColorJitter(brightness=b, contrast=c, saturation=s, hue=hue) \
            if any(color_jitter) else None

    def __call__(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        """Apply the pipeline; ``rng`` drives the geometric randomness, torch's RNG the jitter."""
        img = random_resize_long(img, self.low, self.high, rng)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if self.jitter is not None:
            img = self.jitter(img)
        arr = random_crop(normalize(img), self.crop_size, rng)
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
