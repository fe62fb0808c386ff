"""Stage 2: connect the stage-1 Q-Former to the frozen LLM (LM / prefix-LM loss) aligned to the P-Former.

    python -m jobs.pretrain_llm --config configs/tiny/stage2.yaml [key=value ...] [--summary out.json]

`init_from.qformer` names the stage-1 checkpoint (or its run folder); the P-Former defaults to the
one stage 1 was aligned to.
"""

import sys

from app.cli import run_job
from app.train.launcher import run_stage


def main(argv=None) -> int:
    return run_job(__doc__.splitlines()[0], "llm", run_stage, argv)


if __name__ == "__main__":
    sys.exit(main())
