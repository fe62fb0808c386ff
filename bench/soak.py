"""Soak: stage 1 on the tiny models for thousands of steps over the same real shards, watching memory.

    python bench/soak.py [--steps 3000] [--workers 1]

Stage 1 (tiny BERT Q-Former, tiny OPT, a tiny random BLIP-2 vision tower, an untrained P-Former written by the
training code) on WebDataset shards of 48 real Flickr8k photos (240 image-caption samples, made by
jobs.make_shards), so the run passes over them again and again (16 per step: 3,000 steps are 200 epochs, each
reading and decoding the shards anew). Every 2 s it samples the resident memory (VmRSS) of the process that
trains (the Ray Train worker; this process in local mode, --workers 0) and the object store's use
(`ray memory --stats-only`). Prints one JSON line: RSS at the end of warm-up (the first 10% of the training
time) and its highest value over the last half of the run, their ratio, the object store's highest use.
Record it in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def rss_mb(pid: int) -> float | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) / 1024 if match else None


def trainer_pids(local_mode: bool) -> list[int]:
    if local_mode:
        return [os.getpid()]
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()
    return [int(line.split()[0]) for line in out if "ray::RayTrainWorker" in line]


def plasma_mib() -> float | None:
    from ray._private.internal_api import memory_summary

    try:
        match = re.search(r"Plasma memory usage (\d+) MiB", memory_summary(stats_only=True))
    except Exception:  # the summary is best effort; a missing sample is not a failure of the run
        return None
    return float(match.group(1)) if match else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers (0: local mode)")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from app.config import load_config
    from app.models.tiny import build_tiny_vision, prepare_tiny_models
    from app.train.launcher import run_stage, start_local_ray
    from conftest import FLICKR, STAGE1_CONFIG, coco_captions, make_shards_cli, mlflow_store, stage_args, \
        subset_captions, write_pformer_checkpoint

    root = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    cache = Path(os.environ.get("PFORMER_TEST_CACHE", Path.home() / ".cache" / "pformer-tests")) / "tiny_models"
    models = prepare_tiny_models(cache, coco_captions(20_000))
    vision = {"blip2": build_tiny_vision(root / "vision", kind="blip2")}
    pformer = write_pformer_checkpoint(root / "pformer" / "checkpoint_00000001", models)
    shards = root / "shards"
    done = make_shards_cli("--images", FLICKR / "images", "--captions", subset_captions(root / "captions.json", 48),
                           "--out", shards, "--shard-size", "80")
    assert done.returncode == 0, done.stderr[-3000:]
    start_local_ray(num_cpus=8)

    samples: list[tuple[float, float, float | None]] = []  # (seconds since the first trainer sample, RSS MB, plasma)
    stop = threading.Event()

    def watch() -> None:
        first = None
        while not stop.is_set():
            rss = [r for r in map(rss_mb, trainer_pids(args.workers == 0)) if r is not None]
            if rss:
                first = first if first is not None else time.monotonic()
                samples.append((time.monotonic() - first, sum(rss), plasma_mib()))
            stop.wait(2.0)

    cfg = load_config(STAGE1_CONFIG, stage_args(root, models, vision, mlflow_store(root / "mlflow.db"), **{
        "init_from.pformer": pformer, "data.train": str(shards), "scaling.num_workers": args.workers,
        "train.max_steps": args.steps, "train.epochs": 10_000, "train.log_every_steps": 50,
        "train.checkpoint_every_steps": max(args.steps // 3, 1), "run.name": "soak"}))
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    started = time.perf_counter()
    summary = run_stage(cfg)
    wall = time.perf_counter() - started
    stop.set()
    watcher.join()

    end = samples[-1][0]
    warm = [rss for t, rss, _ in samples if t <= 0.1 * end]
    late = [rss for t, rss, _ in samples if t >= 0.5 * end]
    plasma = [p for _, _, p in samples if p is not None]
    print(json.dumps({
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "steps": summary["step"], "workers": args.workers,
        "wall_s": round(wall, 1), "samples": len(samples), "data": summary["data"],
        "rss_mb_end_of_warmup": round(warm[-1], 1), "rss_mb_max_last_half": round(max(late), 1),
        "rss_growth": round(max(late) / warm[-1] - 1, 4), "rss_mb_min_max": [round(min(s[1] for s in samples), 1),
                                                                              round(max(s[1] for s in samples), 1)],
        "plasma_mib_max": max(plasma) if plasma else None, "plasma_mib_last": plasma[-1] if plasma else None}))


if __name__ == "__main__":
    main()
