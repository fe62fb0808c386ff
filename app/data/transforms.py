"""Images: decode to RGB and transform (train: random resized crop + flip; eval: resize), as uint8 HWC.

Grayscale, CMYK, palette and alpha images become RGB (alpha is composited on white); high bit depth
grayscale is scaled to 8 bits; an EXIF orientation tag is applied (the picture as viewers show it and
captions describe it; the reference's `Image.open(...).convert("RGB")` ignores the tag, which no image of
COCO or Flickr8k carries). An image of more than PIL's `Image.MAX_IMAGE_PIXELS` (89M) pixels after JPEG
draft scaling is refused before it is decoded (`ImageTooLarge`). The animated formats give their first
frame. The vision encoder normalises the uint8 pixels on the device.
"""

from __future__ import annotations

import io
import math
from typing import Optional

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
ORIENTATION_TAG = 0x0112


class ImageTooLarge(ValueError):
    """More pixels than PIL's decompression-bomb limit: refused before decoding."""


def decode_image(data: bytes, draft_size: Optional[int] = None) -> tuple[Image.Image, Optional[str]]:
    """Decode to RGB; returns (image, original mode if it was converted). Raises on corrupt or
    truncated data, ImageTooLarge (or PIL's DecompressionBombError) for images too large to decode.
    `draft_size`: let the JPEG decoder scale down by powers of two while keeping both sides >= draft_size
    (much faster for large photos, same result after resizing)."""
    img = Image.open(io.BytesIO(data))  # reads the header only; refuses sizes over twice the limit
    if draft_size and img.format == "JPEG":
        img.draft(None, (draft_size, draft_size))
    limit = Image.MAX_IMAGE_PIXELS
    if limit and img.width * img.height > limit:
        raise ImageTooLarge(f"{img.width}x{img.height} pixels, more than PIL's limit of {limit}")
    img.load()
    if img.getexif().get(ORIENTATION_TAG, 1) != 1:
        img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode == "RGB":
        return img, None
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background, mode
    if mode in ("I", "I;16", "I;16B", "F"):  # high bit depth grayscale: scale to 8 bits first
        arr = np.asarray(img, dtype=np.float32)
        top = float(arr.max()) or 1.0
        img = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8))
    return img.convert("RGB"), mode


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator, scale: tuple[float, float] = (0.5, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a crop covering `scale` of the area with aspect ratio in `ratio`
    (torchvision's RandomResizedCrop sampling, including its centre-crop fallback)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def transform_image(img: Image.Image, size: int, train: bool, rng: Optional[np.random.Generator] = None,
                    min_scale: float = 0.5, flip: bool = True) -> np.ndarray:
    """uint8 (size, size, 3). Train: random resized crop (area in [min_scale, 1]; 1 = the whole image) +
    horizontal flip (when `flip`);
    eval: resize to size x size (BLIP-2's eval transform). Bicubic resampling."""
    if train:
        assert rng is not None
        box = random_resized_crop_box(img.width, img.height, rng, (min_scale, 1.0))
        arr = np.asarray(img.resize((size, size), Image.BICUBIC, box=box))
        if flip and rng.random() < 0.5:
            arr = arr[:, ::-1]
        return np.ascontiguousarray(arr)
    return np.asarray(img.resize((size, size), Image.BICUBIC))
