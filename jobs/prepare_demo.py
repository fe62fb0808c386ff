"""Generate the embedded default's corpus, image shards and tiny models under .demo/ (cached; a rerun is instant).

    python -m jobs.prepare_demo [--root .demo] [--with-t5]
    python -m jobs.prepare_demo --video [--clips ../shared/data/msrvtt/captions.json] [--text ...msrvtt_captions.tsv]
"""

import argparse
import sys

from app.cli import run_command
from app.demo.assets import DEFAULT_ROOT, VIDEO_DATA, prepare_demo_assets, prepare_video_assets


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(DEFAULT_ROOT))
    parser.add_argument("--with-t5", action="store_true",
                        help="also pre-train a tiny T5-style LLM (<root>/models/t5; about 2.5 minutes on 2 cores)")
    parser.add_argument("--video", action="store_true",
                        help="the tiny video configs' assets instead (<root>/video: clip shards, tokenizers and a tiny "
                             "T5 trained on the caption text, a tiny CLIP-style tower; about 3 minutes)")
    parser.add_argument("--clips", default=str(VIDEO_DATA / "msrvtt" / "captions.json"),
                        help="--video: listing of the clips {id: {file, captions}} (default %(default)s)")
    parser.add_argument("--text", default=str(VIDEO_DATA / "text" / "msrvtt_captions.tsv"),
                        help="--video: caption text (.tsv with a 'caption' column) for the tokenizers and the T5")
    args = parser.parse_args(argv)

    def body() -> dict:
        if args.video:
            paths = prepare_video_assets(args.root, args.clips, args.text)
        else:
            paths = prepare_demo_assets(args.root, llms=("opt", "t5") if args.with_t5 else ("opt",))
        for name, path in paths.items():
            print(f"{name}: {path}")
        return paths

    return run_command(body, expected=(FileNotFoundError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
