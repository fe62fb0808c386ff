"""Evaluate a trained checkpoint (captioning, zero-shot VQA, retrieval), or score a captions results file.

Score an existing COCO results file (no model, no Ray):
    python -m jobs.evaluate --task caption --results R.json --annotations A.json [--summary out.json]

Caption a set with a stage-2 checkpoint (beam search, Ray Data batch inference) and score it:
    python -m jobs.evaluate --task caption --checkpoint CKPT --data SHARDS
    python -m jobs.evaluate --task caption --checkpoint CKPT --images DIR --captions captions.json
    python -m jobs.evaluate --task caption --checkpoint CKPT --images DIR --annotations captions_val2014.json
Zero-shot VQA (VQAv2 accuracy, or exact match for GQA-style single answers):
    python -m jobs.evaluate --task vqa --checkpoint CKPT --questions Q.json --annotations A.json --images DIR
Image-text retrieval (ITC + ITM re-ranking of the top k; stage-1 or stage-2 checkpoint):
    python -m jobs.evaluate --task retrieval --checkpoint CKPT --images DIR --captions captions.json [--k 128]

CKPT is a checkpoint folder or a run folder (its latest checkpoint), local or s3://. Metrics use
pycocoevalcap's names (Bleu_1..Bleu_4, METEOR, ROUGE_L, CIDEr, SPICE; SPICE is null when its Stanford
models are not installed). Outputs go to --out (results, per-item scores, metrics.json, samples.png)
and to MLflow: a child run of the training run that wrote the checkpoint, or --mlflow-run-id.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

DEFAULT_VQA_PROMPT = "Question: {} Short answer:"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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
    from dataclasses import replace

    from app.evaluation.model import VQA_OPTIONS, GenerationOptions

    options = VQA_OPTIONS if task == "vqa" else GenerationOptions()
    given = {k: getattr(args, k) for k in ("num_beams", "max_new_tokens", "min_new_tokens", "length_penalty",
                                           "repetition_penalty") if getattr(args, k) is not None}
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
    from app.evaluation.model import find_checkpoint

    allowed = ("qformer", "llm") if args.task == "retrieval" else ("llm",)
    purpose = "retrieval" if args.task == "retrieval" else f"--task {args.task} (text generation)"
    checkpoint, _ = find_checkpoint(args.checkpoint, s3, allowed, purpose)
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


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from app.config import ConfigError
    from app.evaluation.captioning import EvaluationError
    from app.evaluation.data import EvalDataError
    from app.train.checkpoint import CheckpointError

    if args.results and args.checkpoint:
        parser.error("give --results (score a file) or --checkpoint (generate and score), not both")
    if not args.results and not args.checkpoint:
        parser.error("give --checkpoint (or, for --task caption, --results with --annotations)")
    if args.results and (args.task != "caption" or not args.annotations):
        parser.error("--results scores captions: it needs --task caption and --annotations")
    try:
        summary = score_results_file(args) if args.results else run_with_model(args)
    except (EvaluationError, EvalDataError, CheckpointError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_summary(summary)
    if args.summary:
        Path(args.summary).parent.mkdir(parents=True, exist_ok=True)
        Path(args.summary).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
