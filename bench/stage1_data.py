"""Stage-1 input pipeline: image-text samples/s from Ray Data against a plain single-process loop, one run.

    python bench/stage1_data.py [--image-size 224] [--batch-size 64] [--passes 2] [--num-cpus 2]

Both sides do the same work on the same shards: the real Flickr8k photos of ../shared/data/flickr8k
written as WebDataset shards (one sample per caption, 4,375 samples) -> read the tar members -> decode
the JPEG -> random resized crop + flip to image-size -> clean the caption -> tokenize it for the
Q-Former/P-Former (BERT WordPiece) and the LLM (byte-level BPE) -> uint8 pixels + int token arrays.
The plain loop calls the same functions (`iter_tar_samples`, `preprocess_image_batch`) in one process;
the Ray side is `app.data.samples.image_text_dataset`, the exact dataset stage 1 trains on, consumed
with `iter_batches` as the trainer's shard iterator would. Throughput is the steady state: the first
batch (worker start-up, imports) is left out on both sides. Prints one JSON line; record it in
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FLICKR = Path(os.environ.get("PFORMER_SHARED_DATA", ROOT.parent / "shared" / "data")) / "flickr8k"


def plain_loop(shards: list[Path], spec, image_size: int, batch_size: int, passes: int) -> tuple[float, int]:
    import pyarrow as pa

    from app.data.samples import preprocess_image_batch
    from app.data.media import MediaSpec
    from app.data.sources import SCHEMA, iter_tar_samples

    samples, start, rows = 0, None, []

    def flush():
        nonlocal samples, start, rows
        out = preprocess_image_batch(pa.Table.from_pylist(rows, schema=SCHEMA), media=MediaSpec(size=image_size, train=True),
                                     captions=spec)
        rows = []
        if start is None:  # the first batch pays the tokenizer loading: left out, as on the Ray side
            start = time.perf_counter()
            return
        samples += len(out["pixels"])

    for _ in range(passes):
        for shard in shards:
            with open(shard, "rb") as f:
                for row in iter_tar_samples(f, str(shard)):
                    rows.append(row)
                    if len(rows) == batch_size:
                        flush()
    if rows:
        flush()
    return samples / (time.perf_counter() - start), samples


def ray_pipeline(shard_dir: Path, spec, cfg, image_size: int, batch_size: int, passes: int) -> tuple[float, int]:
    from app.data.samples import image_text_dataset

    samples, start = 0, None
    for _ in range(passes):
        ds = image_text_dataset(str(shard_dir), cfg, train=True, image_size=image_size, captions=spec)
        for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=4):
            if start is None:
                start = time.perf_counter()
                continue
            samples += len(batch["pixels"])
    return samples / (time.perf_counter() - start), samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--passes", type=int, default=2, help="passes over the 4,375 samples on each side")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="CPUs Ray Data may use")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import ray

    from app.models.tiny import tiny_config
    from app.data.captions import CaptionSpec
    from app.data.shards import load_captions_json, make_shards
    from app.demo.assets import prepare_demo_assets

    models = prepare_demo_assets(ROOT / ".demo")  # tiny tokenizers (cached after the first run)
    ray.init(num_cpus=max(args.num_cpus, 1), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory() as tmp:
        shard_dir = Path(tmp) / "shards"
        make_shards(str(FLICKR / "images"), load_captions_json(FLICKR / "captions.json"), str(shard_dir),
                    shard_size=500)
        shards = sorted(shard_dir.glob("*.tar"))
        spec = CaptionSpec(qformer=models["bert"], pformer=models["bert"], llm=models["opt"], max_txt_len=32)
        cfg = tiny_config()
        ray_rate, ray_samples = ray_pipeline(shard_dir, spec, cfg, args.image_size, args.batch_size, args.passes)
        plain_rate, plain_samples = plain_loop(shards, spec, args.image_size, args.batch_size, args.passes)
    ray.shutdown()
    print(json.dumps({
        "bench": "stage1_data", "image_size": args.image_size, "batch_size": args.batch_size, "passes": args.passes,
        "shards": len(shards), "plain_samples_per_s": round(plain_rate, 1), "ray_samples_per_s": round(ray_rate, 1),
        "ratio": round(ray_rate / plain_rate, 3), "timed_samples": {"plain": plain_samples, "ray": ray_samples},
        "ray_data_cpus": args.num_cpus, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
