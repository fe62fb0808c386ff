"""Shared command-line handling for the stage jobs: --config, dotted overrides, --summary."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Callable, Optional

from app.config import Config, ConfigError, load_config
from app.train.checkpoint import CheckpointError
from app.data.stats import DataError


def stage_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML file with deviations from the defaults")
    parser.add_argument("--summary", help="write a JSON summary (MLflow run id, checkpoint URI, final metrics)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return parser


def run_job(description: str, stage: str, run: Callable[[Config], dict], argv: Optional[list[str]] = None) -> int:
    """Parse, validate (before any Ray resource), run, write the summary. Exit 2 on bad input."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = stage_parser(description).parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.stage != stage:
            raise ConfigError(f"stage: this job trains stage '{stage}', the config says '{cfg.stage}'")
        summary = run(cfg)
    except (ConfigError, CheckpointError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.summary:
        Path(args.summary).parent.mkdir(parents=True, exist_ok=True)
        Path(args.summary).write_text(json.dumps(summary, indent=2))
    return 0
