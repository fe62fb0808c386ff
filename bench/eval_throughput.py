"""Caption generation throughput: batched Ray Data inference vs a one-image-at-a-time loop, in one run.

    python bench/eval_throughput.py --checkpoint CKPT [--images DIR] [--count 96] [--batch-size 16]

Both sides caption the same real photos with the same stage-2 checkpoint and BLIP-2's beam search
(5 beams, 8-30 new tokens). The loop reads, decodes, resizes and generates one image at a time in this
process (model loaded before its clock starts); the Ray side is `app.evaluation.inference.run_generation`
(CPU decode tasks feeding an actor pool that generates in batches) on a local Ray instance with the
machine's CPUs, timed end to end including actor start-up and model loading. Prints captions/s for
each side and the ratio (target >= 3).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "flickr8k" / "images"


def loop_side(checkpoint: str, files: list[Path], options) -> tuple[float, list[str]]:
    import torch

    from app.data.transforms import decode_image, transform_image
    from app.evaluation.model import TrainedBLIP2

    model = TrainedBLIP2.from_checkpoint(checkpoint, device="cpu")
    texts = []
    start = time.perf_counter()
    for path in files:
        image, _ = decode_image(path.read_bytes(), draft_size=2 * model.image_size)
        pixels = torch.from_numpy(transform_image(image, model.image_size, train=False)[None].copy())
        texts += model.generate(pixels, [model.prompt], options)
    return time.perf_counter() - start, texts


def ray_side(checkpoint: str, files: list[Path], options, batch_size: int, num_actors: int) -> tuple[float, list[str]]:
    import ray

    from app.evaluation import data as eval_data
    from app.evaluation.inference import InferenceSettings, run_generation
    from app.train.checkpoint import find_checkpoint
    from app.evaluation.tasks import checkpoint_image_size

    uri, manifest = find_checkpoint(checkpoint, ("llm",), None, purpose="captioning")
    items = [eval_data.eval_item(f"{i:06d}-{p.name}", str(p), (), manifest.get("prompt") or "") for i, p in enumerate(files)]
    start = time.perf_counter()
    result = run_generation(eval_data.items_dataset(items), checkpoint=uri, image_size=checkpoint_image_size(uri, None),
                            options=options, s3=None,
                            settings=InferenceSettings(batch_size=batch_size, num_actors=num_actors, keep_thumbs=False))
    seconds = time.perf_counter() - start
    ray.shutdown()
    return seconds, [r["text"] for r in result.rows]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="stage-2 checkpoint or run folder")
    parser.add_argument("--images", default=str(DEFAULT_IMAGES))
    parser.add_argument("--count", type=int, default=3500,
                        help="captions to generate; the photos are cycled when there are fewer (default %(default)s: "
                             "4 passes over Flickr8k's 875, so the Ray side's fixed start-up cost is amortised as on a "
                             "real evaluation set such as COCO's 5,000-image test split)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-actors", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads on the loop side")
    args = parser.parse_args()

    import ray
    import torch

    from app.evaluation.model import GenerationOptions

    photos = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    files = [photos[i % len(photos)] for i in range(args.count)]
    options = GenerationOptions()  # BLIP-2's captioning defaults
    torch.set_num_threads(args.threads)
    loop_s, loop_texts = loop_side(args.checkpoint, files, options)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray_s, ray_texts = ray_side(args.checkpoint, files, options, args.batch_size, args.num_actors)
    same = sum(a == b for a, b in zip(loop_texts, ray_texts))  # both in input order
    result = {"images": len(files), "loop_captions_per_s": round(len(files) / loop_s, 2),
              "ray_captions_per_s": round(len(files) / ray_s, 2), "ratio": round(loop_s / ray_s, 2),
              "identical_captions": same, "batch_size": args.batch_size, "num_actors": args.num_actors,
              "cpus": os.cpu_count()}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
