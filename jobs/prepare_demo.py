"""Generate the embedded default's corpus, image shards and tiny models under .demo/ (cached; a rerun is instant).

    python -m jobs.prepare_demo [--root .demo]
"""

import argparse
import sys

from app.demo.assets import DEFAULT_ROOT, prepare_demo_assets


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(DEFAULT_ROOT))
    args = parser.parse_args(argv)
    for name, path in prepare_demo_assets(args.root).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
