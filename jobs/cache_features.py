"""Precompute the frozen image features and P-Former outputs of a stage-1/2 run's training shards.

    python -m jobs.cache_features --config configs/stage1_opt2.7b.yaml cache.out=s3://bucket/cache/coco [key=value ...]
    python -m jobs.pretrain_qformer --config configs/stage1_opt2.7b.yaml data.train_features=s3://bucket/cache/coco

The config is the one the stage will train with (its model.vision, init_from.pformer, data.train,
data.image_size, data.num_frames); the `cache` section says where and how (see app/config.py: kind
features|prompts, dtype, store sentence|prompts, batch_size, num_actors). Resumable: rerun the same
command after an interruption and only unfinished shards are computed. Features use eval transforms:
the cache trades augmentation for speed (kind=prompts keeps augmentation and caches only the P-Former).
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
    parser.add_argument("--config", help="the stage-1 or stage-2 config the cache is for")
    parser.add_argument("--max-shards", type=int, help="compute at most this many shards now (rerun to go on)")
    parser.add_argument("--summary", help="also write the manifest (or progress) JSON here")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. cache.out=...")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from app import storage
    from app.cache import cache_features, stage_for
    from app.config import ConfigError, load_config
    from app.train.checkpoint import CheckpointError
    from app.train.launcher import init_ray, resolve_paths

    try:
        cfg = load_config(args.config, args.overrides)
        if not cfg.cache.out:
            raise ConfigError("cache.out: where to write the cache is required (a folder or s3:// prefix)")
        s3 = storage.S3Options(cfg.storage.s3_endpoint, cfg.storage.s3_region)
        cfg.data.train_features = None  # the training config may already name the cache this job writes
        if not cfg.data.train:
            raise ConfigError("data.train: the shards to cache are required")
        cfg = stage_for(cfg).validate(resolve_paths(cfg), s3)  # resolves the P-Former, checks the shards
        if not storage.is_s3(cfg.cache.out):
            cfg.cache.out = storage.resolve(cfg.cache.out)[1]
        local = init_ray(cfg)
        try:
            summary = cache_features(cfg, s3, max_shards=args.max_shards)
        finally:
            if local:
                import ray

                ray.shutdown()
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.summary:
        Path(args.summary).parent.mkdir(parents=True, exist_ok=True)
        Path(args.summary).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
