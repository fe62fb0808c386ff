"""Generate the embedded default's corpus, image shards and tiny models under .demo/ (cached; a rerun is instant).

    python -m jobs.prepare_demo [--root .demo] [--with-t5]
"""

import argparse
import sys

from app.demo.assets import DEFAULT_ROOT, prepare_demo_assets


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(DEFAULT_ROOT))
    parser.add_argument("--with-t5", action="store_true",
                        help="also pre-train a tiny T5-style LLM (<root>/models/t5; about 2.5 minutes on 2 cores)")
    args = parser.parse_args(argv)
    llms = ("opt", "t5") if args.with_t5 else ("opt",)
    for name, path in prepare_demo_assets(args.root, llms=llms).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
