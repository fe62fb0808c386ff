"""Caption images (or video clips) with a trained stage-2 checkpoint.

    python -m jobs.caption --checkpoint CKPT photo.jpg                # prints the caption
    python -m jobs.caption --checkpoint CKPT clip.mp4                 # a video model: frames sampled as in eval
    python -m jobs.caption --checkpoint CKPT photos/ [--out c.jsonl]  # a folder: Ray Data batch inference
    python -m jobs.caption --checkpoint CKPT s3://bucket/shards/      # image-text shards (.tar / .parquet)

CKPT is a stage-2 checkpoint or run folder, local or s3://. One image runs in this process; a folder
or shards run through the same Ray Data pipeline as `jobs.evaluate`, print one line per image and
write JSONL ({"id", "source", "caption"}) to --out (default captions.jsonl). Unreadable images are
skipped and reported. Generation defaults are BLIP-2's (5 beams, 8-30 new tokens).
"""

from __future__ import annotations

import argparse
import logging
import sys

from app.cli import parser, run_command


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("input", help="an image or clip, a folder of them, or image/video-text shards (local or s3://)")
    p.add_argument("--checkpoint", required=True, help="stage-2 checkpoint or run folder (local or s3://)")
    p.add_argument("--prompt", help="text prompt before the caption (default: the one the checkpoint was trained with)")
    p.add_argument("--out", default="captions.jsonl", help="JSONL output for a folder or shards (default %(default)s)")
    p.add_argument("--num-beams", type=int)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--min-new-tokens", type=int)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-actors", type=int)
    p.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--s3-endpoint")
    p.add_argument("--s3-region")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    def body() -> dict:
        from app.evaluation.commands import caption_command

        return caption_command(args)

    return run_command(body, expected=(ValueError,))


if __name__ == "__main__":
    sys.exit(main())
