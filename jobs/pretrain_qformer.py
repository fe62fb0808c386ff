"""Stage 1: train the Q-Former on image-text shards (ITC + ITM + ITG) aligned to the frozen P-Former.

    python -m jobs.pretrain_qformer --config configs/tiny/stage1.yaml [key=value ...] [--summary out.json]

`init_from.pformer` names the stage-0 checkpoint (or its run folder); `loss.align_weight=0` without a
P-Former trains plain BLIP-2 through the same code.
"""

import sys

from app.cli import run_job
from app.train.launcher import run_stage


def main(argv=None) -> int:
    return run_job(__doc__.splitlines()[0], "qformer", run_stage, argv)


if __name__ == "__main__":
    sys.exit(main())
