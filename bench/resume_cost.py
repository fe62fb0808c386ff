"""What a mid-epoch resume costs: launch to the first steps after a restart at 10% vs 90% of an epoch.

    python bench/resume_cost.py [--repeats 2] [--photos 400] [--code DIR]

Stage 1 on the tiny models (as bench/soak.py) in local mode, on WebDataset shards of `--photos` real Flickr8k
photos (5 captions each: 2,000 samples by default, 10 shards), 16 samples per step, a shuffle buffer of 256
rows (the default buffer of 10,000 rows would hold the whole of this small epoch, so every start would first
decode all that is left of it, which hides what a resume skips). For each position a run trains to that step
of epoch 0 and stops with a checkpoint (untimed); a relaunch of the same run name then trains two more steps,
timed from `run_stage` to its summary (start-up, reaching the first step, two steps, one checkpoint). Positions
alternate 10%, 90%, 10%, 90%, ... in one process. `--code DIR`: import the project from another checkout (the
same measurement of an older commit). Prints one JSON line; record it in bench/RESULTS.md.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--photos", type=int, default=400)
    parser.add_argument("--code", type=Path, default=Path(__file__).resolve().parents[1])
    args = parser.parse_args()
    sys.path[:0] = [str(args.code), str(args.code / "tests")]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from app.config import load_config
    from app.models.tiny import build_tiny_vision, prepare_tiny_models
    from app.train.launcher import run_stage, start_local_ray
    from conftest import FLICKR, STAGE1_CONFIG, coco_captions, make_shards_cli, mlflow_store, stage_args, \
        subset_captions, write_pformer_checkpoint

    root = Path(tempfile.mkdtemp(prefix="bench-resume-"))
    cache = Path(os.environ.get("PFORMER_TEST_CACHE", Path.home() / ".cache" / "pformer-tests")) / "tiny_models"
    models = prepare_tiny_models(cache, coco_captions(20_000))
    vision = {"blip2": build_tiny_vision(root / "vision", kind="blip2")}
    pformer = write_pformer_checkpoint(root / "pformer" / "checkpoint_00000001", models)
    shards = root / "shards"
    done = make_shards_cli("--images", FLICKR / "images", "--captions",
                           subset_captions(root / "captions.json", args.photos), "--out", shards,
                           "--shard-size", "200")
    assert done.returncode == 0, done.stderr[-3000:]
    start_local_ray(num_cpus=8)
    batch = 16
    epoch_steps = args.photos * 5 // batch
    positions = {"10%": round(0.1 * epoch_steps), "90%": round(0.9 * epoch_steps)}

    def run(name: str, steps: int) -> tuple[float, dict]:
        cfg = load_config(STAGE1_CONFIG, stage_args(root, models, vision, mlflow_store(root / "mlflow.db"), **{
            "init_from.pformer": pformer, "data.train": str(shards), "scaling.num_workers": 0,
            "train.batch_size_per_worker": batch, "data.shuffle_buffer_rows": 256, "train.max_steps": steps,
            "train.checkpoint_every_steps": 1000, "train.log_every_steps": 1000, "run.name": name}))
        started = time.perf_counter()
        summary = run_stage(cfg)
        return time.perf_counter() - started, summary

    walls: dict[str, list[float]] = {p: [] for p in positions}
    decoded: dict[str, list[int]] = {p: [] for p in positions}
    for i in range(args.repeats):
        for label, step in positions.items():
            run(f"at-{label[:-1]}-{i}", step)
            wall, summary = run(f"at-{label[:-1]}-{i}", step + 2)
            assert summary["step"] == step + 2, summary
            walls[label].append(wall)
            decoded[label].append(summary["data"].get("rows_read", 0))
            print(f"[bench] resume at {label} (step {step} of {epoch_steps}): {wall:.1f} s, "
                  f"{decoded[label][-1]} rows decoded", flush=True)
    medians = {p: statistics.median(v) for p, v in walls.items()}
    print(json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "code": str(args.code),
                      "epoch_samples": args.photos * 5, "epoch_steps": epoch_steps, "resume_steps": positions,
                      "walls_s": {p: [round(x, 1) for x in v] for p, v in walls.items()},
                      "rows_decoded": decoded, "median_s": {p: round(v, 1) for p, v in medians.items()},
                      "ratio_90_over_10": round(medians["90%"] / medians["10%"], 2)}))


if __name__ == "__main__":
    main()
