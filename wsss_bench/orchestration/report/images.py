"""Report images: VOC-coloured masks, CAM heat maps, thumbnails and ``data:`` URIs."""
from __future__ import annotations

import base64
import io as _io

import numpy as np
from PIL import Image

from ...data.voc import voc_palette

THUMB = 128           # longest side of example thumbnails (pixels)
GALLERY_THUMB = 96    # gallery thumbnails are smaller: a gallery can hold ~100 of them
JPEG_QUALITY = 80

_PALETTE = voc_palette()


def colour_hex(index: int) -> str:
    """``#rrggbb`` of a class index in the VOC palette."""
    r, g, b = (int(v) for v in _PALETTE[index])
    return f"#{r:02x}{g:02x}{b:02x}"


def mask_image(mask: np.ndarray) -> Image.Image:
    """A label map as a palette ('P') image with VOC colours, so it stays a small PNG."""
    image = Image.fromarray(np.asarray(mask, np.uint8), mode="P")
    image.putpalette(_PALETTE.reshape(-1).tolist())
    return image


def heatmap_overlay(image: Image.Image, cam: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """A CAM in [0, 1] drawn with the jet colour map over the image."""
    from matplotlib import (
        colormaps,  # the registry only; pyplot's global state is not touched
    )

    colours = colormaps["jet"](np.clip(cam, 0.0, 1.0))[..., :3] * 255.0
    base = np.asarray(image.convert("RGB"), np.float32)
    if base.shape[:2] != cam.shape:
        base = np.asarray(image.convert("RGB").resize(cam.shape[::-1], Image.BILINEAR), np.float32)
    blended = (1.0 - alpha) * base + alpha * colours
    return Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8), mode="RGB")


def thumbnail(image: Image.Image, size: int = THUMB, nearest: bool = False) -> Image.Image:
    """A copy no larger than ``size`` on its longest side (masks resized without blending)."""
    copy = image.copy()
    copy.thumbnail((size, size), Image.NEAREST if nearest else Image.BILINEAR)
    return copy


def data_uri(image: Image.Image, kind: str = "jpeg") -> str:
    """An image encoded as a ``data:`` URI: JPEG for photos, PNG for masks and plots."""
    buffer = _io.BytesIO()
    if kind == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=True)
        mime = "image/jpeg"
    else:
        image.save(buffer, format="PNG", optimize=True)
        mime = "image/png"
    return f"data:{mime};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def png_uri(data: bytes) -> str:
    """PNG bytes (a saved plot) as a ``data:`` URI, re-encoded with a 256-colour palette.

    Matplotlib writes 32-bit RGBA; a plot has few distinct colours, so an adaptive palette
    looks the same at a quarter of the size (the PNG under ``plots/`` keeps full colour).
    """
    with Image.open(_io.BytesIO(data)) as image:
        image.load()
        buffer = _io.BytesIO()
        image.convert("RGB").quantize(colors=256).save(buffer, format="PNG", optimize=True)
    smaller = buffer.getvalue() if buffer.tell() < len(data) else data
    return "data:image/png;base64," + base64.b64encode(smaller).decode("ascii")
