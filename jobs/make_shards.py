"""Turn a folder of images (or video clips) + captions into WebDataset shards, locally or on S3.

    python -m jobs.make_shards --images DIR --captions DIR/captions.json --out URI [--shard-size N] [--per caption|file]
    python -m jobs.make_shards --images DIR --coco-annotations captions_train2014.json --out s3://bucket/coco/
    python -m jobs.make_shards --captions msrvtt/captions.json --out s3://bucket/msrvtt/ --per file   # video clips

`--per caption` (default) writes one sample per caption (the usual pre-training layout); `--per file`
one sample per image with all its captions in `<key>.json` (training samples one per pass; evaluation
uses them all as references).
"""

from __future__ import annotations

import sys

from app import storage
from app.cli import parser, run_command


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--images", help="folder with the image (or video) files; default: the folder of --captions")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--captions", help="captions.json: {file: [captions]}")
    source.add_argument("--coco-annotations", help="COCO caption annotation file (images + annotations)")
    p.add_argument("--out", required=True, help="output folder or s3:// prefix")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--per", choices=("caption", "file"), default="caption")
    p.add_argument("--s3-endpoint", default=None, help="S3 endpoint URL (default: AWS environment)")
    p.add_argument("--s3-region", default=None)
    p.add_argument("--summary", help="write the shard index (counts) to this JSON file as well")
    args = p.parse_args(argv)

    def body() -> dict:
        from app.data.shards import shards_from_listing

        index = shards_from_listing(images=args.images, captions=args.captions, coco_annotations=args.coco_annotations,
                                    out=args.out, shard_size=args.shard_size, per=args.per,
                                    s3=storage.S3Options(args.s3_endpoint, args.s3_region))
        print(f"wrote {index['samples']} samples from {index['files']} files into {len(index['shards'])} shards "
              f"at {args.out} ({index['bytes'] / 2**20:.1f} MiB); skipped: {index['skipped_missing_files']} missing "
              f"files, {index['skipped_uncaptioned_files']} without captions")
        if index["missing_examples"]:
            print(f"missing files (first {len(index['missing_examples'])}): {', '.join(index['missing_examples'])}")
        return index

    return run_command(body, args.summary, expected=(FileNotFoundError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
