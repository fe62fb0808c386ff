"""One media decoder for every consumer (training, the feature cache, evaluation, the caption command):
bytes + extension -> uint8 pixels, or a `SkipSample` naming why the sample is unusable.

`MediaSpec` says how: the output size, `num_frames` (a video model: clips sampled as in
`app.data.video`, images repeated as one-frame clips; None: an image model, which skips clips), and the
train-time augmentation (random resized crop with area in [min_scale, 1], horizontal flip) or the eval
transform (resize). Skip reasons, one vocabulary everywhere: `empty_file`, `corrupt_image`,
`image_too_large` (over PIL's decompression-bomb limit), `video_in_image_run`, and the clip reasons of `app.data.video` (`corrupt_video`, `truncated_video`,
`no_video_stream`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image

from app.data.transforms import IMAGE_EXTENSIONS, ImageTooLarge, decode_image, transform_image
from app.data.video import VIDEO_EXTENSIONS, VideoDecodeError, clip_pixels, is_video

MEDIA_EXTENSIONS = IMAGE_EXTENSIONS + VIDEO_EXTENSIONS


@dataclass(frozen=True)
class MediaSpec:
    size: int
    train: bool = False
    num_frames: Optional[int] = None
    min_scale: float = 0.5  # data.min_crop_scale
    flip: bool = True       # data.horizontal_flip

    @classmethod
    def from_config(cls, cfg, *, size: int, train: bool) -> "MediaSpec":
        return cls(size=size, train=train, num_frames=cfg.model.num_frames or None,
                   min_scale=cfg.data.min_crop_scale, flip=cfg.data.horizontal_flip)


class SkipSample(ValueError):
    """An unusable sample; `reason` is its skip-count name, `detail` what exactly was wrong."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}{detail}")
        self.reason, self.detail = reason, detail


def decode_sample(data: Optional[bytes], ext: str, spec: MediaSpec,
                  rng: Optional[np.random.Generator] = None) -> tuple[np.ndarray, Optional[str]]:
    """uint8 (S, S, 3), or (T, S, S, 3) with spec.num_frames, and the original image mode when it was
    converted to RGB (None otherwise). Raises SkipSample. `rng` is required in training."""
    if not data:
        raise SkipSample("empty_file", " (zero-byte file)")
    ext = (ext or "").lower().lstrip(".")
    try:
        if spec.num_frames:
            return clip_pixels(data, ext, num_frames=spec.num_frames, size=spec.size, train=spec.train, rng=rng,
                               min_scale=spec.min_scale, flip=spec.flip)
        if is_video(ext):
            raise SkipSample("video_in_image_run", f" (a .{ext} clip; the model takes images: model.num_frames "
                                                   f"is not set)")
        img, converted = decode_image(data, draft_size=2 * spec.size)
        return transform_image(img, spec.size, spec.train, rng, spec.min_scale, spec.flip), converted
    except VideoDecodeError as err:
        raise SkipSample(err.reason, f" ({err})") from None
    except (ImageTooLarge, Image.DecompressionBombError) as err:
        raise SkipSample("image_too_large", f" ({err})") from None
    except SkipSample:
        raise
    except Exception as err:  # PIL raises many types for corrupt data (OSError, SyntaxError, ValueError...)
        raise SkipSample("corrupt_image", f" ({type(err).__name__}: {err})") from None
