"""Video input: clips/s decoded and sampled by the Ray Data stage against a plain PyAV loop, one run.

    python bench/video_decode.py [--frames 8] [--image-size 224] [--repeat 8] [--num-cpus 2]

The clips: the 18 real MSR-VTT clips of ../shared/data/msrvtt (h264 with AAC audio; 640x360 and
smaller, 1, 2 and 25 fps; 22 to 293 frames), each written `--repeat` times (different keys) into
WebDataset shards of 12 samples. Per clip, every side produces the same thing: `--frames` RGB frames,
one from the centre of each equal segment of the clip, resized to image-size (bicubic), as uint8.

  plain      a plain loop with PyAV in one process, the usual way: open the clip, decode every frame to
             an RGB array, take the sampled ones, resize them with Pillow.
  same-fn    the project's decoder (`app.data.video.clip_pixels`: converts only the sampled frames and
             stops after the last) in the same single-process loop: the decoding strategy alone.
  ray        `app.data.samples.image_text_dataset` with model.num_frames (the dataset stages 1 and 2 train
             on: tar read, decode, sample, transform), consumed with `iter_batches` as a trainer would.

Eval transforms on all sides (centre positions, no crop), so the work is identical. Warm: the loops
leave out their first clip (imports), the Ray side first runs one shard (worker start-up), then times a
whole pass from building the dataset to its last batch. Prints one JSON line; record it in
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MSRVTT = Path(os.environ.get("PFORMER_SHARED_DATA", ROOT.parent / "shared" / "data")) / "msrvtt"
SHARD_SIZE = 24


def write_shards(out: Path, repeat: int) -> list[tuple[str, bytes]]:
    """Shards of the clips repeated `repeat` times; returns the (key, bytes) list in shard order."""
    listing = json.loads((MSRVTT / "captions.json").read_text())
    clips = [(f"r{r}_{key}", (MSRVTT / entry["file"]).read_bytes(), entry["captions"][0])
             for r in range(repeat) for key, entry in sorted(listing.items())]
    out.mkdir(parents=True)
    for index, start in enumerate(range(0, len(clips), SHARD_SIZE)):
        with tarfile.open(out / f"shard-{index:05d}.tar", "w") as tar:
            for key, data, caption in clips[start:start + SHARD_SIZE]:
                for ext, payload in (("mp4", data), ("txt", caption.encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return [(key, data) for key, data, _ in clips]


def plain_clip(data: bytes, frames: int, size: int):
    import av
    import numpy as np
    from PIL import Image

    from app.data.video import frame_indices

    with av.open(io.BytesIO(data)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]
    picks = frame_indices(len(decoded), frames, train=False)
    return np.stack([np.asarray(Image.fromarray(decoded[i]).resize((size, size), Image.BICUBIC)) for i in picks])


def loop(clips: list[tuple[str, bytes]], fn) -> tuple[float, int]:
    start, count = None, 0
    for _, data in clips:
        out = fn(data)
        assert out.ndim == 4
        if start is None:  # the first clip pays the imports: left out, as on the Ray side
            start = time.perf_counter()
            continue
        count += 1
    return count / (time.perf_counter() - start), count


def ray_side(shard_dir: Path, cfg, size: int, batch_size: int) -> tuple[float, int]:
    from app.data.captions import CaptionSpec
    from app.data.samples import image_text_dataset

    def one_pass(uri: str) -> int:
        ds = image_text_dataset(uri, cfg, train=False, image_size=size, captions=CaptionSpec())
        return sum(len(b["pixels"]) for b in ds.iter_batches(batch_size=batch_size, batch_format="numpy",
                                                              prefetch_batches=4))

    one_pass(str(shard_dir / "shard-00000.tar"))  # warm-up: worker processes start and import
    start = time.perf_counter()
    count = one_pass(str(shard_dir))
    return count / (time.perf_counter() - start), count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeat", type=int, default=8, help="copies of the 18 clips (default 8: 144 clips)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="CPUs Ray Data may use")
    args = parser.parse_args()

    import ray

    from app.models.tiny import tiny_config
    from app.data.video import clip_pixels

    cfg = tiny_config(data={"num_frames": args.frames})
    with tempfile.TemporaryDirectory() as tmp:
        clips = write_shards(Path(tmp) / "shards", args.repeat)
        plain_rate, plain_n = loop(clips, lambda d: plain_clip(d, args.frames, args.image_size))
        same_rate, same_n = loop(clips, lambda d: clip_pixels(d, "mp4", num_frames=args.frames, size=args.image_size,
                                                                train=False)[0])
        ray.init(num_cpus=max(args.num_cpus, 1), include_dashboard=False, log_to_driver=False)
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        ray_rate, ray_n = ray_side(Path(tmp) / "shards", cfg, args.image_size, args.batch_size)
        ray.shutdown()
    print(json.dumps({
        "bench": "video_decode", "frames": args.frames, "image_size": args.image_size, "clips": len(clips),
        "plain_clips_per_s": round(plain_rate, 2), "same_fn_clips_per_s": round(same_rate, 2),
        "ray_clips_per_s": round(ray_rate, 2), "ratio_ray_vs_plain": round(ray_rate / plain_rate, 3),
        "ratio_ray_vs_same_fn": round(ray_rate / same_rate, 3), "timed_clips": {"plain": plain_n, "same_fn": same_n,
                                                                                 "ray": ray_n},
        "ray_data_cpus": args.num_cpus, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
