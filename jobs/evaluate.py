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

import logging
import sys

from app.cli import run_command
from app.evaluation.commands import evaluate_parser


def main(argv=None) -> int:
    parser = evaluate_parser(__doc__)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.results and args.checkpoint:
        parser.error("give --results (score a file) or --checkpoint (generate and score), not both")
    if not args.results and not args.checkpoint:
        parser.error("give --checkpoint (or, for --task caption, --results with --annotations)")
    if args.results and (args.task != "caption" or not args.annotations):
        parser.error("--results scores captions: it needs --task caption and --annotations")

    def body() -> dict:
        from app.evaluation.commands import print_summary, run_with_model, score_results_file

        summary = score_results_file(args) if args.results else run_with_model(args)
        print_summary(summary)
        return summary

    return run_command(body, args.summary)


if __name__ == "__main__":
    sys.exit(main())
