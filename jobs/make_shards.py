"""Turn a folder of images (or video clips) + captions into WebDataset shards, locally or on S3.

    python -m jobs.make_shards --images DIR --captions DIR/captions.json --out URI [--shard-size N] [--per caption|file]
    python -m jobs.make_shards --images DIR --coco-annotations captions_train2014.json --out s3://bucket/coco/
    python -m jobs.make_shards --captions msrvtt/captions.json --out s3://bucket/msrvtt/ --per file   # video clips

`--per caption` (default) writes one sample per caption (the usual pre-training layout); `--per file`
one sample per image with all its captions in `<key>.json` (training samples one per pass; evaluation
uses them all as references).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from app import storage


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", help="folder with the image (or video) files; default: the folder of --captions")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--captions", help="captions.json: {file: [captions]}")
    source.add_argument("--coco-annotations", help="COCO caption annotation file (images + annotations)")
    parser.add_argument("--out", required=True, help="output folder or s3:// prefix")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--per", choices=("caption", "file"), default="caption")
    parser.add_argument("--s3-endpoint", default=None, help="S3 endpoint URL (default: AWS environment)")
    parser.add_argument("--s3-region", default=None)
    parser.add_argument("--summary", help="write the shard index (counts) to this JSON file as well")
    args = parser.parse_args(argv)

    import ray

    from app.data.shards import listed_keys, load_captions_json, load_coco_annotations, make_shards

    try:
        if args.coco_annotations and not args.images:
            raise ValueError("--coco-annotations needs --images (the folder of the images it names)")
        images = args.images or os.path.dirname(os.path.abspath(args.captions))
        captions = (load_captions_json(args.captions) if args.captions else load_coco_annotations(args.coco_annotations))
        keys = listed_keys(args.captions) if args.captions else None
        if not ray.is_initialized():
            if os.environ.get("RAY_ADDRESS"):
                ray.init()
            else:  # extra logical CPUs: on a 2-core machine Ray Data would otherwise get no budget
                ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False)
        index = make_shards(images, captions, args.out, shard_size=args.shard_size, per=args.per,
                            s3=storage.S3Options(args.s3_endpoint, args.s3_region), keys=keys)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {index['samples']} samples from {index['files']} files into {len(index['shards'])} shards "
          f"at {args.out} ({index['bytes'] / 2**20:.1f} MiB); skipped: {index['skipped_missing_files']} missing "
          f"files, {index['skipped_uncaptioned_files']} without captions")
    if index["missing_examples"]:
        print(f"missing files (first {len(index['missing_examples'])}): {', '.join(index['missing_examples'])}")
    if args.summary:
        with open(args.summary, "w") as f:
            json.dump(index, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
