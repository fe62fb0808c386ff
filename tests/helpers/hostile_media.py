"""Fuzzed and hostile samples through the one media decoder, in a process of its own (its peak memory is
its own): `python tests/helpers/hostile_media.py SHARED_DATA WORKDIR [--mutants-per-image N]` writes two
WebDataset tars (images; clips) of mutants of the real Flickr8k JPEGs and MSR-VTT mp4s plus hand-made
hostile samples, reads them back as training does (iter_tar_samples -> decode_rows, one row at a time
so each is timed) and prints one JSON summary: counts by outcome, per-sample outcomes of the hand-made
ones, the slowest sample and the peak RSS.
"""

from __future__ import annotations

import io
import json
import resource
import struct
import sys
import tarfile
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from app.data.captions import CaptionSpec  # noqa: E402
from app.data.media import MediaSpec  # noqa: E402
from app.data.samples import decode_rows  # noqa: E402
from app.data.sources import iter_tar_samples  # noqa: E402

MAGIC = [b"\x89PNG\r\n\x1a\n", b"GIF89a", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"BM", b"\x00\x00\x00\x18ftypmp42",
         b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", b"PK\x03\x04", b"\x1a\x45\xdf\xa3"]


def mutate(data: bytes, kind: str, rng: np.random.Generator) -> bytes:
    buf = bytearray(data)
    if kind.startswith("flip"):
        n = int(kind[4:])
        for i in rng.integers(0, len(buf), n):
            buf[i] ^= int(rng.integers(1, 256))
    elif kind == "truncate":
        buf = buf[: int(rng.integers(1, len(buf)))]
    elif kind == "header":
        magic = MAGIC[int(rng.integers(len(MAGIC)))]
        buf[: len(magic)] = magic
    elif kind == "zero_block":
        start = int(rng.integers(0, max(1, len(buf) - 1024)))
        buf[start:start + 1024] = bytes(min(1024, len(buf) - start))
    elif kind == "swap_blocks":
        a, b = sorted(int(x) for x in rng.integers(0, max(1, len(buf) - 512), 2))
        if b - a >= 512:
            buf[a:a + 512], buf[b:b + 512] = buf[b:b + 512], buf[a:a + 512]
    elif kind == "head_only":
        buf = buf[:64]
    return bytes(buf)


IMAGE_MUTATIONS = ["flip1", "flip8", "flip64", "truncate", "truncate", "header", "zero_block", "swap_blocks",
                   "head_only", "flip512"]
VIDEO_MUTATIONS = ["flip8", "flip64", "truncate", "header", "zero_block", "swap_blocks"]


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **kw)
    return out.getvalue()


def hostile_images(real_jpeg: bytes) -> dict[str, tuple[str, bytes, bytes]]:
    """name -> (extension, media bytes, caption bytes): the hand-made cases."""
    bomb = (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0))
            + png_chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + png_chunk(b"IEND", b""))
    big = encoded(Image.new("1", (10_000, 10_000)), "PNG")  # 100M pixels: over the limit, under twice it
    frames = [Image.new("RGB", (32, 32), c) for c in ("red", "green", "blue")]
    webp = io.BytesIO()
    frames[0].save(webp, format="WEBP", save_all=True, append_images=frames[1:], duration=50)
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    rotated = encoded(Image.new("RGB", (40, 20), "white"), "JPEG", exif=exif.tobytes())
    caption = b"a dog runs on the grass"
    return {
        "bomb_png": ("png", bomb, caption),
        "big_png": ("png", big, caption),
        "one_pixel": ("png", encoded(Image.new("RGB", (1, 1), "red"), "PNG"), caption),
        "animated_webp": ("webp", webp.getvalue(), caption),
        "animated_gif": ("gif", gif.getvalue(), caption),
        "png_16bit": ("png", encoded(Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16), "PNG"),
                      caption),
        "exif_rotated": ("jpg", rotated, caption),
        "long_caption": ("jpg", real_jpeg, ("a dog " * 16_667).encode()[:100_000]),
        "nul_caption": ("jpg", real_jpeg, b"a dog\x00 runs\x00"),
        "invalid_utf8_caption": ("jpg", real_jpeg, b"a dog \xff\xfe\xc3\x28 runs"),
        "empty_image": ("jpg", b"", caption),
        "../../etc/traversal": ("jpg", real_jpeg, caption),
    }


def declared_frames(clip: bytes, frames: int) -> bytes:
    """The clip with its sample-size box declaring `frames` samples (the table itself is unchanged)."""
    at = clip.find(b"stsz")
    if at < 0:
        return clip
    count_at = at + 4 + 4 + 4  # version/flags, sample_size, then sample_count
    return clip[:count_at] + struct.pack(">I", frames) + clip[count_at + 4:]


def write_tar(path: Path, samples: dict[str, tuple[str, bytes, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, (ext, media, caption) in samples.items():
            for suffix, data in ((ext, media), ("txt", caption)):
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def run(shared: Path, work: Path, per_image: int) -> dict:
    rng = np.random.default_rng(0)
    jpegs = sorted((shared / "flickr8k" / "images").glob("*.jpg"))[:40]
    clips = sorted((shared / "msrvtt" / "videos").glob("*.mp4"))
    images: dict[str, tuple[str, bytes, bytes]] = {}
    for i, path in enumerate(jpegs):
        data = path.read_bytes()
        for j, kind in enumerate((IMAGE_MUTATIONS * 4)[:per_image]):
            images[f"img{i:02d}_{j:02d}_{kind}"] = ("jpg", mutate(data, kind, rng), b"a photo")
    special = hostile_images(jpegs[0].read_bytes())
    images.update(special)
    videos: dict[str, tuple[str, bytes, bytes]] = {}
    for i, path in enumerate(clips):
        data = path.read_bytes()
        for j, kind in enumerate(VIDEO_MUTATIONS):
            videos[f"clip{i:02d}_{j}_{kind}"] = ("mp4", mutate(data, kind, rng), b"a clip")
    videos["declared_100000_frames"] = ("mp4", declared_frames(clips[0].read_bytes(), 100_000), b"a clip")
    write_tar(work / "images.tar", images)
    write_tar(work / "clips.tar", videos)

    totals: Counter = Counter()
    outcomes: dict[str, str] = {}
    slowest = (0.0, "")
    captions = CaptionSpec()
    for tar_name, media in (("images.tar", MediaSpec(size=64, train=True)),
                            ("clips.tar", MediaSpec(size=64, train=True, num_frames=4))):
        with open(work / tar_name, "rb") as f:
            for row in iter_tar_samples(f, tar_name):
                start = time.perf_counter()
                out = decode_rows([row], media=media, captions=captions, rng=np.random.default_rng(1))
                took = time.perf_counter() - start
                slowest = max(slowest, (took, row["key"]))
                totals.update(out.counts)
                totals["rows_kept"] += len(out.texts)
                if out.texts:
                    shape = list(out.pixels[0].shape)
                    text = out.texts[0]
                    outcomes[row["key"]] = f"kept {shape}" + (
                        f" caption of {len(text)} chars{' with a control character' if any(ord(c) < 32 for c in text) else ''}"
                        if row["key"] in ("long_caption", "nul_caption") else "")
                else:
                    outcomes[row["key"]] = out.examples[0]["reason"].split(" ")[0]
    from app.data.transforms import decode_image

    upright, _ = decode_image(special["exif_rotated"][1])
    return {"counts": dict(totals), "mutants": sum(1 for k in outcomes if k.startswith(("img", "clip"))),
            "special": {k: v for k, v in outcomes.items() if not k.startswith(("img", "clip"))},
            "exif_rotated_size": list(upright.size), "slowest_s": round(slowest[0], 3), "slowest": slowest[1],
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


if __name__ == "__main__":
    per = int(sys.argv[sys.argv.index("--mutants-per-image") + 1]) if "--mutants-per-image" in sys.argv else 10
    print(json.dumps(run(Path(sys.argv[1]), Path(sys.argv[2]), per)))
