"""Score generated captions with the COCO caption protocol (pycocoevalcap).

    python -m jobs.evaluate --task caption --results R.json --annotations A.json [--summary out.json]

`--results` is a COCO results file (`[{"image_id": ..., "caption": ...}]`); `--annotations` a COCO
caption annotation file (or `{image_id: [captions]}`). Prints and writes the metrics under
pycocoevalcap's names: Bleu_1..Bleu_4, METEOR, ROUGE_L, CIDEr, SPICE (null when its Stanford models
are not installed). `--per-image FILE` also writes each image's scores.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=("caption",), required=True)
    parser.add_argument("--results", required=True, help="COCO results file to score")
    parser.add_argument("--annotations", required=True, help="COCO caption annotations (or {image_id: [captions]})")
    parser.add_argument("--summary", help="write the metrics to this JSON file")
    parser.add_argument("--per-image", help="write per-image scores to this JSON file")
    parser.add_argument("--no-spice", action="store_true", help="skip SPICE even when it is installed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from app.evaluation.captioning import EvaluationError, load_references, load_results, score_captions

    try:
        results, references = load_results(args.results), load_references(args.annotations)
        metrics, per_image = score_captions(results, references, spice=not args.no_spice)
    except EvaluationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"scored {len(per_image)} images ({len(results)} results, {len(references)} reference images)")
    for name, value in metrics.items():
        print(f"{name:8s} {'unavailable' if value is None else f'{value:.3f}'}")
    for path, payload in ((args.summary, {"task": "caption", "images": len(per_image), "metrics": metrics}),
                          (args.per_image, {str(k): v for k, v in per_image.items()})):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
