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

import logging
import sys

from app.cli import parser, run_command


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--config", required=True, help="stage config (stage: pformer/qformer/llm) or pipeline config")
    p.add_argument("--space", required=True, help="search space YAML (tune_spaces/*.yaml)")
    p.add_argument("--num-samples", type=int, default=1, help="samples per grid point (default 1)")
    p.add_argument("--scheduler", default="fifo", choices=["fifo", "asha"], help="asha: stop weak trials early (stage configs)")
    p.add_argument("--metric", help="metric that ranks trials (default: the stage's main loss without the alignment "
                                    "term; CIDEr for pipeline sweeps)")
    p.add_argument("--mode", choices=["min", "max"], help="default: min for losses, max otherwise")
    p.add_argument("--max-concurrent", type=int, help="default: from the cluster's CPUs/GPUs")
    p.add_argument("--name", help="sweep name (default sweep-<stage>-<time>)")
    p.add_argument("--out", help="output folder (default outputs/<name>)")
    p.add_argument("--summary", help="write the summary JSON (trials, best trial, its config and checkpoint)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="fixed overrides for every trial")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    summary: dict = {}

    def body() -> dict:
        from app.config import ConfigError
        from app.pipeline import is_pipeline_config
        from app.sweep import SweepSettings, load_space, run_sweep

        if args.num_samples < 1:
            raise ConfigError("--num-samples must be at least 1")
        settings = SweepSettings(num_samples=args.num_samples, scheduler=args.scheduler, metric=args.metric,
                                 mode=args.mode, max_concurrent=args.max_concurrent, name=args.name)
        summary.update(run_sweep(load_space(args.space), settings, config_path=args.config, overrides=args.overrides,
                                 pipeline=is_pipeline_config(args.config), out_dir=args.out))
        return summary

    code = run_command(body, args.summary)
    return code or (0 if summary.get("best") else 1)  # 1: no trial gave a result


if __name__ == "__main__":
    sys.exit(main())
