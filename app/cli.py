"""The one job harness: every `jobs/*.py` parses its arguments and hands its body to `run_command`, which
turns a `UserError` (a bad key, a missing path, a wrong checkpoint, unusable data) into one line on
stderr and exit code 2, and writes the summary JSON (`--summary`). Stage jobs use `run_job`: --config,
dotted overrides, --summary."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from app.config import Config, ConfigError, load_config
from app.errors import UserError


def parser(doc: str, *, epilog: bool = True) -> argparse.ArgumentParser:
    """An argument parser whose description is the job's docstring (first line; the rest as epilog)."""
    return argparse.ArgumentParser(description=doc.splitlines()[0], epilog=doc.split("\n", 2)[2] if epilog else None,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def write_summary(path: Optional[str], summary: Any) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(summary, indent=2, default=str))


def run_command(body: Callable[[], Any], summary: Optional[str] = None,
                expected: tuple[type[BaseException], ...] = ()) -> int:
    """Run a job's body; bad input (a UserError, or one of `expected`: errors the body's libraries raise for
    bad input, such as FileNotFoundError) exits 2 with `error: <message>`. Returns the exit code."""
    try:
        result = body()
    except (UserError, *expected) as err:
        print(f"error: {err}", file=sys.stderr)
        return UserError.exit_code
    write_summary(summary, result)
    return 0


def stage_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", help="YAML file with deviations from the defaults")
    p.add_argument("--summary", help="write a JSON summary (MLflow run id, checkpoint URI, final metrics)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return p


def run_job(description: str, stage: str, run: Callable[[Config], dict], argv: Optional[list[str]] = None) -> int:
    """A stage job: parse, validate (before any Ray resource), run, write the summary."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = stage_parser(description).parse_args(argv)

    def body() -> dict:
        cfg = load_config(args.config, args.overrides)
        if cfg.stage != stage:
            raise ConfigError(f"stage: this job trains stage '{stage}', the config says '{cfg.stage}'")
        return run(cfg)

    return run_command(body, args.summary)
