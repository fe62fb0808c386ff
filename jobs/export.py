"""Export a stage-2 checkpoint to Hugging Face `Blip2ForConditionalGeneration` format.

    python -m jobs.export --checkpoint CKPT --out DIR [--log-mlflow] [--register NAME]

The folder loads with `Blip2ForConditionalGeneration.from_pretrained(DIR)` and
`Blip2Processor.from_pretrained(DIR)`, and generates the same captions as the project's own model.
--log-mlflow also logs the folder as artifacts ("hf_model") of the training run that wrote the
checkpoint; --register NAME registers that as a new version of model NAME in the MLflow registry.
"""

from __future__ import annotations

import logging
import sys

from app import storage
from app.cli import parser, run_command


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--checkpoint", required=True, help="stage-2 checkpoint or run folder (local or s3://)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--log-mlflow", action="store_true", help="log the folder to the checkpoint's MLflow run")
    p.add_argument("--register", metavar="NAME", help="register it as a model version (implies --log-mlflow)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the checkpoint's)")
    p.add_argument("--summary", help="write what was exported as JSON")
    p.add_argument("--s3-endpoint")
    p.add_argument("--s3-region")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def body() -> dict:
        from app.export import export_blip2, log_to_mlflow
        from app.train.checkpoint import find_checkpoint

        s3 = storage.S3Options(args.s3_endpoint, args.s3_region)
        checkpoint, _ = find_checkpoint(args.checkpoint, ("llm",), s3, purpose="export to Blip2ForConditionalGeneration")
        info = export_blip2(checkpoint, args.out, s3)
        if args.log_mlflow or args.register:
            info.update(log_to_mlflow(info, args.out, checkpoint, s3, args.tracking_uri, args.register))
        print(f"exported {checkpoint} -> {args.out} (Blip2ForConditionalGeneration, "
              f"{'encoder-decoder' if info['encoder_decoder'] else 'decoder-only'} LLM)")
        if info.get("version"):
            print(f"registered model '{info['registered_model']}' version {info['version']} ({info['artifact']})")
        return info

    return run_command(body, args.summary)


if __name__ == "__main__":
    sys.exit(main())
