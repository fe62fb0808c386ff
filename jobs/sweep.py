"""Sweep config keys with Ray Tune: a stage's TorchTrainer per trial (ASHA can stop weak ones early), or
the whole pipeline per trial.

    python -m jobs.sweep --config configs/tiny/stage1.yaml --space tune_spaces/align_weight.yaml \\
        [--num-samples N] [--scheduler asha] [--metric itc_loss --mode min] [key=value ...] [--summary out.json]
    python -m jobs.sweep --config configs/demo.yaml --space tune_spaces/pipeline_prompt_length.yaml

A space file maps dotted config keys (the command line's; `stage1.loss.align_weight` style for pipeline
configs) to one of {grid: [...]}, {choice: [...]}, {uniform: [lo, hi]}, {loguniform: [lo, hi]},
{randint: [lo, hi]}. Keys, values and whether the stage uses them are checked before any trial starts.
MLflow: a parent run per sweep holding sweep.md / sweep.json / sweep.png, a child run per trial. The
summary JSON names the best trial, its config and checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def is_pipeline_config(path: str | None) -> bool:
    from app.config import read_yaml_mapping

    return bool(path) and any(k in read_yaml_mapping(path) for k in ("pipeline", "common", "stage0", "stage1", "stage2"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="stage config (stage: pformer/qformer/llm) or pipeline config")
    parser.add_argument("--space", required=True, help="search space YAML (tune_spaces/*.yaml)")
    parser.add_argument("--num-samples", type=int, default=1, help="samples per grid point (default 1)")
    parser.add_argument("--scheduler", default="fifo", choices=["fifo", "asha"],
                        help="asha: stop weak trials early (stage configs)")
    parser.add_argument("--metric", help="metric that ranks trials (default: the stage's main loss without the "
                                         "alignment term; CIDEr for pipeline sweeps)")
    parser.add_argument("--mode", choices=["min", "max"], help="default: min for losses, max otherwise")
    parser.add_argument("--max-concurrent", type=int, help="default: from the cluster's CPUs/GPUs")
    parser.add_argument("--name", help="sweep name (default sweep-<stage>-<time>)")
    parser.add_argument("--out", help="output folder (default outputs/<name>)")
    parser.add_argument("--summary", help="write the summary JSON (trials, best trial, its config and checkpoint)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="fixed overrides for every trial")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from app.config import ConfigError
    from app.sweep import SweepSettings, load_space, run_sweep

    try:
        if args.num_samples < 1:
            raise ConfigError("--num-samples must be at least 1")
        dims = load_space(args.space)
        settings = SweepSettings(num_samples=args.num_samples, scheduler=args.scheduler, metric=args.metric,
                                 mode=args.mode, max_concurrent=args.max_concurrent, name=args.name)
        summary = run_sweep(dims, settings, config_path=args.config, overrides=args.overrides,
                            pipeline=is_pipeline_config(args.config), out_dir=args.out)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.summary:
        Path(args.summary).parent.mkdir(parents=True, exist_ok=True)
        Path(args.summary).write_text(json.dumps(summary, indent=2, default=str))
    return 0 if summary.get("best") else 1


if __name__ == "__main__":
    sys.exit(main())
