"""Run the whole method: stage 0 -> 1 -> 2 -> caption evaluation, P-Former vs the BLIP-2 baseline.

    python -m jobs.pipeline --config configs/demo.yaml [section.key=value ...] [--summary out.json]

Overrides name the section first: `stage1.train.max_steps=50`, `common.model.num_query_tokens=8`,
`pipeline.arms=[pformer]`. With the embedded default (configs/demo.yaml) the demo assets under .demo/
are prepared first when missing (cached afterwards). Prints a line per stage, then the comparison table
and the command to browse the runs in MLflow.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="pipeline YAML (pipeline, common, stage0, stage1, stage2)")
    parser.add_argument("--summary", help="write the summary JSON (runs, checkpoints, metrics, table) here")
    parser.add_argument("--out", help="output folder (default outputs/<name>-<time>)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from app.config import ConfigError
    from app.data.stats import DataError
    from app.evaluation.captioning import EvaluationError
    from app.evaluation.data import EvalDataError
    from app.pipeline import load_pipeline_config, run_pipeline
    from app.train.checkpoint import CheckpointError

    try:
        config = load_pipeline_config(args.config, args.overrides)
        if config.demo is not None:
            from app.demo.assets import prepare_demo_assets

            print(f"[pipeline] demo assets in {config.demo.root} (generated on the first run, then reused)", flush=True)
            prepare_demo_assets(**config.demo.model_dump())
        summary = run_pipeline(config, args.out)
    except (ConfigError, CheckpointError, DataError, EvalDataError, EvaluationError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.summary:
        Path(args.summary).parent.mkdir(parents=True, exist_ok=True)
        Path(args.summary).write_text(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
