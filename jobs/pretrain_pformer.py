"""Stage 0: train the P-Former on a text corpus against a frozen LLM.

    python -m jobs.pretrain_pformer --config configs/tiny/stage0.yaml [key=value ...] [--summary out.json]
"""

import sys

from app.cli import run_job
from app.train.launcher import run_stage


def main(argv=None) -> int:
    return run_job(__doc__.splitlines()[0], "pformer", run_stage, argv)


if __name__ == "__main__":
    sys.exit(main())
