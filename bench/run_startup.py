"""What the processes of every Ray Train run import before they work, in fresh interpreters, in one run.

    python bench/run_startup.py [--repeats 5]

Every stage run starts a TrainController and one Ray Data split coordinator per dataset; each unpickles the
run's datasets and so imports the modules of their batch functions (app.data.samples and what it imports),
next to ray.train.torch. The workers import the training loop. This times, alternating A B C A B C:
  A  ray.train.torch + app.data.samples            (what a controller / coordinator imports now)
  B  A + app.models.pformer + app.models.vision    (what it imported while the dataset modules pulled in the
                                                    models; the difference is the model code kept out of them)
  C  app.train.loop                                (a training worker: everything)
Prints one JSON line (medians in seconds and B/A); record it in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETS = {
    "A_controller": "ray.train.torch,app.data.samples",
    "B_controller_with_models": "ray.train.torch,app.data.samples,app.models.pformer,app.models.vision",
    "C_worker": "app.train.loop",
}


def import_seconds(modules: str) -> float:
    code = "import importlib, sys\nfor m in sys.argv[1].split(','):\n    importlib.import_module(m)\n"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, modules], cwd=ROOT, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import_seconds(SETS["C_worker"])  # warm the file cache once
    times: dict[str, list[float]] = {name: [] for name in SETS}
    for _ in range(args.repeats):
        for name, modules in SETS.items():
            times[name].append(import_seconds(modules))
    medians = {name: round(statistics.median(values), 2) for name, values in times.items()}
    print(json.dumps({"machine": f"{platform.machine()} {os.cpu_count()} CPUs", "repeats": args.repeats,
                      "median_s": medians, "all_s": {k: [round(v, 2) for v in vs] for k, vs in times.items()},
                      "B_over_A": round(medians["B_controller_with_models"] / medians["A_controller"], 2)}))


if __name__ == "__main__":
    main()
