"""Precompute the frozen image features and P-Former outputs of a stage-1/2 run's training shards.

    python -m jobs.cache_features --config configs/stage1_opt2.7b.yaml cache.out=s3://bucket/cache/coco [key=value ...]
    python -m jobs.pretrain_qformer --config configs/stage1_opt2.7b.yaml data.train_features=s3://bucket/cache/coco

The config is the one the stage will train with (its model.vision, init_from.pformer, data.train,
data.image_size, model.num_frames); the `cache` section says where and how (see app/config.py: kind
features|prompts, dtype, store sentence|prompts, batch_size, num_actors). Resumable: rerun the same
command after an interruption and only unfinished shards are computed. Features use eval transforms:
the cache trades augmentation for speed (kind=prompts keeps augmentation and caches only the P-Former).
"""

from __future__ import annotations

import logging
import sys

from app.cli import parser, run_command


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--config", help="the stage-1 or stage-2 config the cache is for")
    p.add_argument("--max-shards", type=int, help="compute at most this many shards now (rerun to go on)")
    p.add_argument("--summary", help="also write the manifest (or progress) JSON here")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. cache.out=...")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    def body() -> dict:
        from app.cache import run_cache_job
        from app.config import load_config

        return run_cache_job(load_config(args.config, args.overrides), max_shards=args.max_shards)

    return run_command(body, args.summary, expected=(FileNotFoundError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
