"""What the evaluation commands do (jobs.evaluate, jobs.caption), given their parsed arguments: score a
results file, evaluate a checkpoint on a set (captioning, zero-shot VQA, retrieval), caption one image in
this process or a folder / shards through Ray Data."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from app.cli import parser

DEFAULT_VQA_PROMPT = "Question: {} Short answer:"


def evaluate_parser(doc: str) -> argparse.ArgumentParser:
    """jobs.evaluate's arguments (`doc`: the job's docstring, its help text)."""
    p = parser(doc)
    p.add_argument("--task", choices=("caption", "vqa", "retrieval"), required=True)
    p.add_argument("--checkpoint", help="checkpoint or run folder (local or s3://) to evaluate")
    p.add_argument("--results", help="caption task without a model: COCO results file to score")
    data = p.add_argument_group("evaluation set")
    data.add_argument("--data", help="image-text shards (WebDataset .tar or Parquet), as for training")
    data.add_argument("--images", help="image folder (or one image)")
    data.add_argument("--captions", help="captions.json for --images: {file: [captions]}")
    data.add_argument("--annotations", help="COCO caption annotations (caption), VQAv2 annotations (vqa)")
    data.add_argument("--questions", help="VQAv2 questions JSON, or GQA-style {qid: {imageId, question, answer}}")
    data.add_argument("--image-pattern", default="COCO_val2014_{image_id:012d}.jpg",
                      help="VQAv2 image file name from its image id (default: %(default)s)")
    data.add_argument("--limit", type=int, help="evaluate only the first N images / questions")
    gen = p.add_argument_group("generation (defaults: BLIP-2's; VQA: 5 beams, 1-10 tokens, length penalty -1)")
    gen.add_argument("--prompt", help="text prompt (caption: default the checkpoint's; vqa: a template with {}, "
                                      f"default {DEFAULT_VQA_PROMPT!r})")
    gen.add_argument("--num-beams", type=int)
    gen.add_argument("--max-new-tokens", type=int)
    gen.add_argument("--min-new-tokens", type=int)
    gen.add_argument("--length-penalty", type=float)
    gen.add_argument("--repetition-penalty", type=float)
    gen.add_argument("--metric", choices=("vqa", "exact"), help="vqa task: force VQAv2 accuracy or exact match")
    gen.add_argument("--k", type=int, default=128, help="retrieval: ITM re-ranks each query's top k (0: ITC only)")
    run = p.add_argument_group("running")
    run.add_argument("--out", help="output folder (default: eval/<task>-<checkpoint name>)")
    run.add_argument("--summary", help="also write the summary JSON here")
    run.add_argument("--per-image", help="scoring mode: write per-image scores to this JSON file")
    run.add_argument("--batch-size", type=int, default=16)
    run.add_argument("--num-actors", type=int, help="model replicas (default: one per GPU, else one per 4 CPUs)")
    run.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None,
                     help="run the model on GPUs (default: when the cluster has them)")
    run.add_argument("--grid", type=int, default=8, help="images in samples.png (0: none)")
    run.add_argument("--no-spice", action="store_true", help="skip SPICE even when it is installed")
    run.add_argument("--tracking-uri", help="MLflow tracking URI (default: the one the checkpoint was trained with)")
    run.add_argument("--mlflow-run-id", help="log to this MLflow run instead of a child of the training run")
    run.add_argument("--no-mlflow", action="store_true", help="write files only")
    run.add_argument("--s3-endpoint", help="S3 endpoint URL (default: AWS_ENDPOINT_URL or AWS)")
    run.add_argument("--s3-region")
    return p


def score_results_file(args) -> dict:
    from app.evaluation.captioning import load_references, load_results, score_captions

    results, references = load_results(args.results), load_references(args.annotations)
    metrics, per_image = score_captions(results, references, spice=not args.no_spice)
    print(f"scored {len(per_image)} images ({len(results)} results, {len(references)} reference images)")
    if args.per_image:
        Path(args.per_image).parent.mkdir(parents=True, exist_ok=True)
        Path(args.per_image).write_text(json.dumps({str(k): v for k, v in per_image.items()}, indent=2))
    return {"task": "caption", "images": len(per_image), "metrics": metrics}


def generation_options(args, task: str):
    """BLIP-2's settings for the task (`GenerationOptions`, `VQA_OPTIONS`), with the ones given on the
    command line instead."""
    from dataclasses import replace

    from app.evaluation.model import VQA_OPTIONS, GenerationOptions

    options = VQA_OPTIONS if task == "vqa" else GenerationOptions()
    given = {k: getattr(args, k) for k in ("num_beams", "max_new_tokens", "min_new_tokens", "length_penalty",
                                           "repetition_penalty") if getattr(args, k, None) is not None}
    return replace(options, **given)


def run_with_model(args) -> dict:
    import ray

    from app import storage
    from app.evaluation import tasks
    from app.evaluation.inference import default_settings

    s3 = storage.S3Options(args.s3_endpoint, args.s3_region)
    source = tasks.EvalSource(data=args.data, images=args.images, captions=args.captions, annotations=args.annotations,
                              questions=args.questions, image_pattern=args.image_pattern, limit=args.limit)
    # Fail fast on the checkpoint before starting Ray.
    from app.train.checkpoint import find_checkpoint

    allowed = ("qformer", "llm") if args.task == "retrieval" else ("llm",)
    purpose = "retrieval" if args.task == "retrieval" else f"--task {args.task} (text generation)"
    checkpoint, _ = find_checkpoint(args.checkpoint, allowed, s3, purpose=purpose)
    out = args.out or str(Path("eval") / f"{args.task}-{Path(checkpoint.rstrip('/')).parent.name}"
                                              f"-{Path(checkpoint.rstrip('/')).name}")
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=True)
    settings = default_settings(batch_size=args.batch_size, num_actors=args.num_actors, use_gpu=args.gpu)
    run = tasks.EvalRun(checkpoint=checkpoint, out_dir=out, s3=s3, settings=settings, tracking_uri=args.tracking_uri,
                        mlflow_run_id=args.mlflow_run_id, log_mlflow=not args.no_mlflow, grid_size=args.grid)
    print(f"[evaluate] {args.task} with {checkpoint}: {settings.num_actors} model replica(s), "
          f"batch {settings.batch_size}, {'GPU' if settings.use_gpu else 'CPU'}; outputs in {out}")
    if args.task == "caption":
        return tasks.evaluate_captions(run, source, generation_options(args, "caption"), prompt=args.prompt,
                                       spice=not args.no_spice)
    if args.task == "vqa":
        return tasks.evaluate_vqa(run, source, template=args.prompt or DEFAULT_VQA_PROMPT,
                                  options=generation_options(args, "vqa"), metric=args.metric)
    return tasks.evaluate_retrieval_task(run, source, k=args.k)


def print_summary(summary: dict) -> None:
    for name, value in summary.get("metrics", {}).items():
        shown = "unavailable" if value is None else f"{value:.3f}" if isinstance(value, float) else value
        print(f"{name:8s} {shown}")
    if summary.get("images_skipped"):
        print(f"skipped {summary['images_skipped']} unreadable image(s):")
        for entry in summary.get("skipped", [])[:10]:
            print(f"  {entry['source']} (id {entry['id']}): {entry['reason']}")
    if summary.get("mlflow_run_id"):
        print(f"MLflow run {summary['mlflow_run_id']} at {summary['tracking_uri']}")


def is_shards(uri: str, s3) -> bool:
    from app.data.sources import shard_files

    try:
        shard_files(uri, "auto", s3)
        return True
    except (FileNotFoundError, OSError, ValueError):
        return False


def caption_one(args, s3, options) -> dict:
    import torch

    from app.data.media import MediaSpec, SkipSample, decode_sample
    from app.data.video import is_video
    from app.evaluation.model import TrainedBLIP2
    from app.train.checkpoint import find_checkpoint
    from app.evaluation.tasks import checkpoint_config, checkpoint_image_size

    checkpoint, _ = find_checkpoint(args.checkpoint, ("llm",), s3, purpose="captioning")
    cfg = checkpoint_config(checkpoint, s3)
    num_frames = cfg.model.num_frames
    data, ext = Path(args.input).read_bytes(), Path(args.input).suffix.lower().lstrip(".")
    if is_video(ext) and not num_frames:
        raise ValueError(f"{args.input} is a video, but {checkpoint} was trained on images (no model.num_frames)")
    # The evaluation pipeline's decoding (a video model: a clip's frames, or an image as a one-frame clip).
    media = MediaSpec(size=checkpoint_image_size(checkpoint, s3, cfg), num_frames=num_frames or None)
    try:
        array, _ = decode_sample(data, ext, media)
    except SkipSample as err:
        what = "video" if is_video(ext) else "image"
        raise ValueError(f"{args.input}: not a readable {what} ({err.reason}{err.detail})") from None
    model = TrainedBLIP2.from_checkpoint(checkpoint, s3)
    pixels = torch.from_numpy(array[None].copy())
    prompt = model.prompt if args.prompt is None else args.prompt
    caption = model.generate(pixels, [prompt], options)[0]
    return {"id": Path(args.input).name, "source": args.input, "caption": caption}


def caption_many(args, s3, options) -> tuple[list[dict], list[dict]]:
    import ray

    from app.evaluation import data as eval_data
    from app.evaluation.inference import default_settings, run_generation
    from app.train.checkpoint import find_checkpoint
    from app.evaluation.tasks import checkpoint_config, checkpoint_image_size

    checkpoint, manifest = find_checkpoint(args.checkpoint, ("llm",), s3, purpose="captioning")
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
                            options=options, settings=settings, s3=s3, num_frames=cfg.model.num_frames)
    rows = [{"id": r["id"], "source": r["source"], "caption": r["text"]} for r in result.rows]
    return rows, result.skipped


def caption_command(args) -> dict:
    """jobs.caption: one image or clip in this process (its caption printed), or a folder or shards through
    Ray Data (one line per image, JSONL written to args.out); unreadable images are reported."""
    import sys

    from app import storage
    from app.evaluation.data import EvalDataError
    from app.train.checkpoint import find_checkpoint

    s3 = storage.S3Options(args.s3_endpoint, args.s3_region)
    options = generation_options(args, "caption")
    find_checkpoint(args.checkpoint, ("llm",), s3, purpose="captioning")  # fail fast, before loading anything
    single = not storage.is_s3(args.input) and Path(args.input).is_file()
    if not single and not storage.is_s3(args.input) and not Path(args.input).exists():
        raise EvalDataError(f"no such image, folder or shards: {args.input}")
    if single:
        row = caption_one(args, s3, options)
        print(row["caption"])
        return {"captions": [row], "skipped": []}
    rows, skipped = caption_many(args, s3, options)
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
    return {"captions": rows, "skipped": skipped}
