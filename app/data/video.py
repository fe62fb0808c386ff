"""Video clips for stages 1 and 2: decode with PyAV, sample frames, transform them like images.

Frame sampling (TSN-style, as BLIP-2's video variants and most video-text models): the clip's frames are
split into `num_frames` equal segments and one frame is taken from each, so the frames keep their order
and cover the whole clip. Training takes a random frame within each segment (a new draw every pass);
evaluation takes the centre of each segment (deterministic). A clip with fewer frames than `num_frames`
repeats frames (segments shorter than one frame land on the same frame), so every sample has exactly
`num_frames` frames. Positions are over decoded frames, not timestamps, so clips of any frame rate are
covered evenly.

Decoding reads the clip from bytes in memory (Ray Data keeps the shard bytes; nothing touches the disk),
demuxes only the first video stream (audio tracks are ignored), converts only the sampled frames, and
stops after the last one. The frame count comes from the container; when the container does not record
it, every frame is decoded and counted first. A clip whose stream ends or fails before the frames the
container lists (a truncated download) is skipped as `truncated_video`; one whose container cannot be
read at all (an mp4 cut before its index) as `corrupt_video`.

All frames of a clip get the same crop and flip in training (one random-resized-crop box per clip), so
motion is not turned into jitter. An image is a one-frame clip: in a video run it is repeated
`num_frames` times, and the rest of the model does not know the difference.
"""

from __future__ import annotations

import io
import logging
from typing import Optional

import numpy as np
from PIL import Image

from app.data.transforms import IMAGE_EXTENSIONS, decode_image, random_resized_crop_box, transform_image

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = ("mp4", "webm", "avi", "mkv", "mov", "m4v")


class VideoDecodeError(ValueError):
    """A clip that cannot give frames; `reason` is the skip-count name (no_video_stream, corrupt_video, ...)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def frame_indices(num_total: int, num_frames: int, train: bool, rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """`num_frames` frame positions in [0, num_total), non-decreasing: one per equal segment; a random
    position within the segment for training, its centre for evaluation. Repeats when the clip is short."""
    if num_total <= 0:
        raise ValueError(f"a clip needs at least one frame, got {num_total}")
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    starts = np.arange(num_frames) * (num_total / num_frames)
    if train:
        assert rng is not None, "training draws positions: pass an rng"
        offsets = rng.random(num_frames) * (num_total / num_frames)
    else:
        offsets = np.full(num_frames, 0.5 * num_total / num_frames)
    return np.minimum((starts + offsets).astype(np.int64), num_total - 1)


def _open(data: bytes):
    import av

    if not data:
        raise VideoDecodeError("empty_file", "zero-byte file")
    try:
        container = av.open(io.BytesIO(data), mode="r", metadata_errors="ignore")
    except (av.FFmpegError, ValueError, OSError) as err:
        raise VideoDecodeError("corrupt_video", f"not a readable container ({type(err).__name__}: {err})") from None
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        container.close()
        raise VideoDecodeError("no_video_stream", f"no video stream (streams: {', '.join(kinds)})")
    return container


def _decode(data: bytes, num_frames: int, train: bool,
            rng: Optional[np.random.Generator]) -> tuple[list[Image.Image], int, bool]:
    """(sampled frames, frames decoded, whether decoding raised). No frames when the stream ends before
    the frames the container lists."""
    import av

    container = _open(data)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "SLICE"  # no frame threads: Ray Data already runs one decoder per CPU
        positions = frame_indices(stream.frames, num_frames, train, rng) if stream.frames > 0 else None
        wanted = set(positions.tolist()) if positions is not None else None
        kept: dict[int, Image.Image] = {}
        decoded, broken = 0, False
        try:
            for index, frame in enumerate(container.decode(stream)):
                decoded = index + 1
                if wanted is None or index in wanted:
                    kept[index] = frame.to_image()
                if positions is not None and index >= positions[-1]:
                    break
        except (av.FFmpegError, ValueError, OSError) as err:
            broken = True
            logger.debug("decoding stopped after %d frames: %s", decoded, err)
        if positions is None:  # no frame count in the container: everything was decoded; sample now
            if not decoded or broken:
                return [], decoded, broken
            positions = frame_indices(decoded, num_frames, train, rng)
        if any(i not in kept for i in positions.tolist()):
            return [], decoded, broken
        return [kept[i] for i in positions.tolist()], decoded, broken
    finally:
        container.close()


def decode_frames(data: bytes, num_frames: int, train: bool, rng: Optional[np.random.Generator] = None) -> list[Image.Image]:
    """`num_frames` RGB frames of the clip in `data`, sampled as described above. Raises VideoDecodeError
    (with a skip reason) for a zero-byte file, an unreadable container, no video stream, or no frame."""
    frames, decoded, broken = _decode(data, num_frames, train, rng)
    if not frames and decoded > 0:
        how = "failed" if broken else "ended"
        raise VideoDecodeError("truncated_video", f"decoding {how} after {decoded} frame(s), before the frames "
                                                  f"the container lists")
    if not frames:
        raise VideoDecodeError("corrupt_video", "no frame could be decoded")
    return frames


def transform_frames(frames: list[Image.Image], size: int, train: bool, rng: Optional[np.random.Generator] = None,
                     min_scale: float = 0.5, flip: bool = True) -> np.ndarray:
    """uint8 (T, size, size, 3). Train: one random-resized-crop box and one flip decision for the whole
    clip; eval: resize to size x size (as images). Bicubic resampling."""
    if train:
        assert rng is not None
        width, height = frames[0].size
        box = random_resized_crop_box(width, height, rng, (min_scale, 1.0))
        flipped = flip and rng.random() < 0.5
        out = np.stack([np.asarray(f.resize((size, size), Image.BICUBIC, box=box)) for f in frames])
        return np.ascontiguousarray(out[:, :, ::-1]) if flipped else out
    return np.stack([np.asarray(f.resize((size, size), Image.BICUBIC)) for f in frames])


def is_video(ext: str) -> bool:
    return ext.lower().lstrip(".") in VIDEO_EXTENSIONS


def media_kind(ext: str, data: bytes) -> str:
    """"video" or "image": by the member's extension; by content when there is none (Parquet rows)."""
    ext = ext.lower().lstrip(".")
    if ext in VIDEO_EXTENSIONS:
        return "video"
    if ext in IMAGE_EXTENSIONS:
        return "image"
    try:
        Image.open(io.BytesIO(data))
        return "image"
    except Exception:  # PIL raises several types for data it does not recognise
        return "video"


def clip_pixels(data: bytes, ext: str, *, num_frames: int, size: int, train: bool,
                rng: Optional[np.random.Generator] = None, min_scale: float = 0.5,
                flip: bool = True) -> tuple[np.ndarray, Optional[str]]:
    """uint8 (num_frames, size, size, 3) from a clip, or from an image repeated (a one-frame clip), and the
    original image mode when it was converted to RGB. Raises VideoDecodeError for clips that give no
    frame, and PIL's errors for unreadable images."""
    if media_kind(ext, data) == "video":
        frames = decode_frames(data, num_frames, train, rng)
        return transform_frames(frames, size, train, rng, min_scale, flip), None
    if not data:
        raise VideoDecodeError("empty_file", "zero-byte file")
    img, converted = decode_image(data, draft_size=2 * size)
    one = transform_image(img, size, train, rng, min_scale, flip)
    return np.repeat(one[None], num_frames, axis=0), converted
