"""Caption images (or video clips) with a trained stage-2 checkpoint.

    python -m jobs.caption --checkpoint CKPT photo.jpg                # prints the caption
    python -m jobs.caption --checkpoint CKPT clip.mp4                 # a video model: frames sampled as in eval
    python -m jobs.caption --checkpoint CKPT photos/ [--out c.jsonl]  # a folder: Ray Data batch inference
    python -m jobs.caption --checkpoint CKPT s3://bucket/shards/      # image-text shards (.tar / .parquet)

CKPT is a stage-2 checkpoint or run folder, local or s3://. One image runs in this process; a folder
or shards run through the same Ray Data pipeline as `jobs.evaluate`, print one line per image and
write JSONL ({"id", "source", "caption"}) to --out (default captions.jsonl). Unreadable images are
skipped and reported.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def is_shards(uri: str, s3) -> bool:
    from app.data.images import shard_files

    try:
        shard_files(uri, "auto", s3)
        return True
    except (FileNotFoundError, OSError, ValueError):
        return False


def caption_one(args, s3, options) -> dict:
    import torch

    from app.data.images import decode_image, transform_image
    from app.data.video import VideoDecodeError, clip_pixels, is_video
    from app.evaluation.model import TrainedBLIP2, find_checkpoint
    from app.evaluation.tasks import checkpoint_config, checkpoint_image_size

    checkpoint, _ = find_checkpoint(args.checkpoint, s3, ("llm",), "captioning")
    num_frames = checkpoint_config(checkpoint, s3).data.num_frames
    data, ext = Path(args.input).read_bytes(), Path(args.input).suffix.lower().lstrip(".")
    if is_video(ext) and not num_frames:
        raise ValueError(f"{args.input} is a video, but {checkpoint} was trained on images (no data.num_frames)")
    try:
        if num_frames:  # a video model: a clip's frames, or an image as a one-frame clip
            size = checkpoint_image_size(checkpoint, s3)
            array, _ = clip_pixels(data, ext, num_frames=num_frames, size=size, train=False)
        else:
            image, _ = decode_image(data, draft_size=None)
    except VideoDecodeError as err:
        raise ValueError(f"{args.input}: not a readable video ({err.reason}: {err})") from None
    except Exception as err:  # PIL raises many types for corrupt data
        raise ValueError(f"{args.input}: not a readable image ({type(err).__name__}: {err})") from None
    model = TrainedBLIP2.from_checkpoint(checkpoint, s3)
    if not num_frames:
        array = transform_image(image, model.image_size, train=False)
    pixels = torch.from_numpy(array[None].copy())
    prompt = model.prompt if args.prompt is None else args.prompt
    caption = model.generate(pixels, [prompt], options)[0]
    return {"id": Path(args.input).name, "source": args.input, "caption": caption}


def caption_many(args, s3, options) -> tuple[list[dict], list[dict]]:
    import ray

    from app.evaluation import data as eval_data
    from app.evaluation.inference import default_settings, run_generation
    from app.evaluation.model import find_checkpoint
    from app.evaluation.tasks import checkpoint_config, checkpoint_image_size

    checkpoint, manifest = find_checkpoint(args.checkpoint, s3, ("llm",), "captioning")
    cfg = checkpoint_config(checkpoint, s3)
    prompt = (manifest.get("prompt") or "") if args.prompt is None else args.prompt
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=True)
    if is_shards(args.input, s3):
        source = eval_data.shard_dataset(args.input, prompt=prompt, s3=s3)
    else:
        source = eval_data.items_dataset(eval_data.caption_items(images=args.input, prompt=prompt, s3=s3))
    settings = default_settings(batch_size=args.batch_size, num_actors=args.num_actors, use_gpu=args.gpu)
    result = run_generation(source, checkpoint=checkpoint, image_size=checkpoint_image_size(checkpoint, s3, cfg),
                            options=options, settings=settings, s3=s3, num_frames=cfg.data.num_frames)
    rows = [{"id": r["id"], "source": r["source"], "caption": r["text"]} for r in result.rows]
    return rows, result.skipped


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="an image or clip, a folder of them, or image/video-text shards (local or s3://)")
    p.add_argument("--checkpoint", required=True, help="stage-2 checkpoint or run folder (local or s3://)")
    p.add_argument("--prompt", help="text prompt before the caption (default: the one the checkpoint was trained with)")
    p.add_argument("--out", default="captions.jsonl", help="JSONL output for a folder or shards (default %(default)s)")
    p.add_argument("--num-beams", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=30)
    p.add_argument("--min-new-tokens", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-actors", type=int)
    p.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--s3-endpoint")
    p.add_argument("--s3-region")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from app import storage
    from app.config import ConfigError
    from app.evaluation.data import EvalDataError
    from app.evaluation.model import GenerationOptions, find_checkpoint
    from app.train.checkpoint import CheckpointError

    s3 = storage.S3Options(args.s3_endpoint, args.s3_region)
    options = GenerationOptions(num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                                min_new_tokens=args.min_new_tokens)
    try:
        find_checkpoint(args.checkpoint, s3, ("llm",), "captioning")  # fail fast, before loading anything
        single = not storage.is_s3(args.input) and Path(args.input).is_file()
        if not single and not storage.is_s3(args.input) and not Path(args.input).exists():
            raise EvalDataError(f"no such image, folder or shards: {args.input}")
        if single:
            row = caption_one(args, s3, options)
            print(row["caption"])
            return 0
        rows, skipped = caption_many(args, s3, options)
    except (CheckpointError, ConfigError, EvalDataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for row in rows:
        print(f"{row['id']}\t{row['caption']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"{len(rows)} captions written to {args.out}", file=sys.stderr)
    if skipped:
        print(f"skipped {len(skipped)} unreadable image(s):", file=sys.stderr)
        for entry in skipped:
            print(f"  {entry['shard']}: {entry['reason']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
