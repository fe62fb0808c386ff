"""Export a stage-2 checkpoint to Hugging Face `Blip2ForConditionalGeneration` format.

    python -m jobs.export --checkpoint CKPT --out DIR [--log-mlflow] [--register NAME]

The folder loads with `Blip2ForConditionalGeneration.from_pretrained(DIR)` and
`Blip2Processor.from_pretrained(DIR)`, and generates the same captions as the project's own model.
--log-mlflow also logs the folder as artifacts ("hf_model") of the training run that wrote the
checkpoint; --register NAME registers that as a new version of model NAME in the MLflow registry.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def log_to_mlflow(info: dict, out: str, checkpoint: str, s3, tracking_uri, register) -> dict:
    from app import tracking
    from app.evaluation.tasks import checkpoint_config

    cfg = checkpoint_config(checkpoint, s3)
    uri = tracking.resolve_tracking_uri(tracking_uri or cfg.mlflow.tracking_uri)
    run_id = tracking.find_run(uri, cfg.mlflow.experiment, cfg.run.name, cfg.run.storage_path)
    client = tracking.client(uri)
    if run_id is None:
        run_id = client.create_run(tracking.experiment_id(uri, cfg.mlflow.experiment), run_name=f"export-{cfg.run.name}",
                                   tags={"stage": "export", "checkpoint": checkpoint}).info.run_id
        client.set_terminated(run_id)
    client.log_artifacts(run_id, out, artifact_path="hf_model")
    logged = {"mlflow_run_id": run_id, "tracking_uri": uri, "artifact": f"runs:/{run_id}/hf_model"}
    if register:
        from mlflow.exceptions import MlflowException

        try:
            client.create_registered_model(register)
        except MlflowException:
            pass  # already registered: add a version
        source = client.get_run(run_id).info.artifact_uri.rstrip("/") + "/hf_model"
        version = client.create_model_version(register, source, run_id=run_id,
                                              tags={"format": "transformers.Blip2ForConditionalGeneration",
                                                    "checkpoint": checkpoint})
        logged.update(registered_model=register, version=int(version.version))
    return logged


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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

    from app import storage
    from app.config import ConfigError
    from app.evaluation.model import find_checkpoint
    from app.export import ExportError, export_blip2
    from app.train.checkpoint import CheckpointError

    s3 = storage.S3Options(args.s3_endpoint, args.s3_region)
    try:
        checkpoint, _ = find_checkpoint(args.checkpoint, s3, ("llm",), "export to Blip2ForConditionalGeneration")
        info = export_blip2(checkpoint, args.out, s3)
        if args.log_mlflow or args.register:
            info.update(log_to_mlflow(info, args.out, checkpoint, s3, args.tracking_uri, args.register))
    except (CheckpointError, ConfigError, ExportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {checkpoint} -> {args.out} (Blip2ForConditionalGeneration, "
          f"{'encoder-decoder' if info['encoder_decoder'] else 'decoder-only'} LLM)")
    if info.get("version"):
        print(f"registered model '{info['registered_model']}' version {info['version']} ({info['artifact']})")
    if args.summary:
        with open(args.summary, "w") as f:
            json.dump(info, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
