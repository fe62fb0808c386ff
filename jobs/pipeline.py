"""Run the whole method: stage 0 -> 1 -> 2 -> caption evaluation, P-Former vs the BLIP-2 baseline.

    python -m jobs.pipeline --config configs/demo.yaml [section.key=value ...] [--summary out.json]

Overrides name the section first: `stage1.train.max_steps=50`, `common.model.num_query_tokens=8`,
`pipeline.arms=[pformer]`. With the embedded default (configs/demo.yaml) the demo assets under .demo/
are prepared first when missing (cached afterwards). Prints a line per stage, then the comparison table
and the command to browse the runs in MLflow.
"""

from __future__ import annotations

import logging
import sys

from app.cli import parser, run_command


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--config", required=True, help="pipeline YAML (pipeline, common, stage0, stage1, stage2)")
    p.add_argument("--summary", help="write the summary JSON (runs, checkpoints, metrics, table) here")
    p.add_argument("--out", help="output folder (default outputs/<name>-<time>)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    def body() -> dict:
        from app.pipeline import load_pipeline_config, run_pipeline

        config = load_pipeline_config(args.config, args.overrides)
        if config.demo is not None:
            from app.demo.assets import prepare_demo_assets

            print(f"[pipeline] demo assets in {config.demo.root} (generated on the first run, then reused)", flush=True)
            prepare_demo_assets(**config.demo.model_dump())
        return run_pipeline(config, args.out)

    return run_command(body, args.summary)


if __name__ == "__main__":
    sys.exit(main())
