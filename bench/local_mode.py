"""A short stage-0 run with one Ray Train worker vs in Ray Train's local mode (`scaling.num_workers=0`).

    python bench/local_mode.py [--repeats 3] [--steps 2]

The same run (tiny OPT and BERT from the test cache, the first 30,000 real COCO captions, a checkpoint at the
end) launched through `run_stage` on one local Ray instance, alternating worker / local, one process, so both
sides see the same machine at the same time. Wall seconds of each launch (MLflow run to summary); prints one
JSON line with the medians and worker/local. Record it in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # as the tests run

    from app.config import load_config
    from app.train.launcher import run_stage, start_local_ray
    from conftest import STAGE0_CONFIG, coco_captions, coco_subset, mlflow_store

    from app.models.tiny import prepare_tiny_models

    cache = Path(os.environ.get("PFORMER_TEST_CACHE", Path.home() / ".cache" / "pformer-tests")) / "tiny_models"
    models = prepare_tiny_models(cache, coco_captions(20_000))
    start_local_ray(num_cpus=8)
    root = Path(tempfile.mkdtemp(prefix="bench-local-mode-"))
    walls: dict[str, list[float]] = {"worker": [], "local": []}
    for i in range(args.repeats):
        for side, workers in (("worker", 1), ("local", 0)):
            cfg = load_config(STAGE0_CONFIG, [
                f"run.storage_path={root / 'ckpt'}", f"mlflow.tracking_uri={mlflow_store(root / f'{side}{i}.db')}",
                f"run.name={side}-{i}", f"model.pformer={models['bert']}", f"model.llm={models['opt']}",
                f"data.text={coco_subset()}", f"scaling.num_workers={workers}", f"train.max_steps={args.steps}",
                f"train.checkpoint_every_steps={args.steps}", "train.log_every_steps=1", "train.warmup_steps=1"])
            start = time.perf_counter()
            summary = run_stage(cfg)
            walls[side].append(time.perf_counter() - start)
            assert summary["step"] == args.steps
            print(f"[bench] {side} run {i}: {walls[side][-1]:.1f} s", flush=True)
    medians = {side: statistics.median(v) for side, v in walls.items()}
    print(json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "steps": args.steps,
                      "walls_s": {k: [round(x, 1) for x in v] for k, v in walls.items()},
                      "median_s": {k: round(v, 1) for k, v in medians.items()},
                      "worker_over_local": round(medians["worker"] / medians["local"], 2)}))


if __name__ == "__main__":
    main()
