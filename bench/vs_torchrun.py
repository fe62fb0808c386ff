"""The Ray job against what users would run instead: `torchrun` + a PyTorch DataLoader, on the same work.

    python bench/vs_torchrun.py [--stages pformer qformer] [--reps 2] [--steps 200] [--window 25]

For each stage (0: tiny P-Former + tiny OPT on the demo's 50,000-caption corpus, batch 64; 1: tiny ViT +
tiny Q-Former, ITC + ITM + ITG, on the 875 real Flickr8k photos of ../shared/data as WebDataset shards, batch
32, align weight 0 so that no stage-0 checkpoint is needed), the same config runs as
  A  the project's job, `python -m jobs.pretrain_<stage> --config ...`: a local Ray instance, Ray Data
     streaming and decoding, a 1-worker TorchTrainer (1 CPU, so 1 torch thread), MLflow on SQLite, a
     checkpoint at the end;
  B  `torchrun --standalone --nproc_per_node=1 bench/torchrun_baseline.py --config ...`: the same model,
     step and data functions, with a DataLoader of 1 worker process decoding on the fly, 1 torch thread;
alternating A B A B (--reps pairs), each in a fresh process. Data on local disk.
Steady state: samples/s over every logging window after the first (which holds the start-up and
warm-up). Start-up: seconds from launching the command to the end of the first window, less that
window's steady-state duration (what the run costs beyond training; the Ray side includes starting a
local Ray instance, which a job submitted to a running cluster does not pay). Prints one JSON line per
run and a summary line per stage; record them in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FLICKR = Path(os.environ.get("PFORMER_SHARED_DATA", ROOT.parent / "shared" / "data")) / "flickr8k"
PYTHON = sys.executable
TORCHRUN = shutil.which("torchrun", path=str(Path(PYTHON).parent)) or "torchrun"
JOBS = {"pformer": ("jobs.pretrain_pformer", "configs/tiny/demo_stage0.yaml"),
        "qformer": ("jobs.pretrain_qformer", "configs/tiny/stage1.yaml")}


def overrides(stage: str, assets: dict, shards: Path, tmp: Path, steps: int, window: int, name: str) -> list[str]:
    common = [f"train.max_steps={steps}", f"train.log_every_steps={window}", f"train.checkpoint_every_steps={steps}",
              "scaling.num_workers=1", "scaling.cpus_per_worker=1", f"run.storage_path={tmp}/ckpt", f"run.name={name}",
              f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db", "train.warmup_steps=10"]
    if stage == "pformer":
        return common + [f"data.text={assets['text']}", f"model.pformer={assets['bert']}", f"model.llm={assets['opt']}",
                         "train.batch_size_per_worker=64"]
    return common + [f"data.train={shards}", "data.val=null", "init_from.pformer=null", "loss.align_weight=0",
                     f"model.vision={assets['vision']}", f"model.qformer={assets['bert']}", f"model.llm={assets['opt']}",
                     "train.batch_size_per_worker=32", "data.shuffle_buffer_rows=256"]


def windows_summary(first_end: float, launched: float, rates: list[float], window: int, batch: int) -> dict:
    """Steady samples/s over the windows after the first, and the start-up estimate."""
    steady_rates = rates[1:]
    seconds = sum(window * batch / r for r in steady_rates)
    steady = len(steady_rates) * window * batch / seconds
    return {"steady_samples_per_s": round(steady, 2), "windows": len(rates),
            "startup_s": round(first_end - launched - window * batch / steady, 2),
            "window_rates": [round(r, 1) for r in rates]}


def run_ray(stage: str, args: list[str], tmp: Path, window: int, batch: int) -> dict:
    from mlflow.tracking import MlflowClient

    module, config = JOBS[stage]
    summary_path = tmp / f"summary-{time.time_ns()}.json"
    launched = time.time()
    proc = subprocess.run([PYTHON, "-m", module, "--config", config, *args, "--summary", str(summary_path)], cwd=ROOT,
                          capture_output=True, text=True)
    wall = time.time() - launched
    if proc.returncode != 0:
        raise RuntimeError(f"the Ray job failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    summary = json.loads(summary_path.read_text())
    uri = next(a.split("=", 1)[1] for a in args if a.startswith("mlflow.tracking_uri="))
    history = sorted(MlflowClient(uri).get_metric_history(summary["mlflow_run_id"], "samples_per_s"),
                     key=lambda m: m.step)
    history = [m for m in history if m.step % window == 0]
    out = windows_summary(history[0].timestamp / 1000, launched, [m.value for m in history], window, batch)
    return {**out, "wall_s": round(wall, 1)}


def run_torchrun(stage: str, args: list[str], window: int, batch: int) -> dict:
    _, config = JOBS[stage]
    launched = time.time()
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=1", "bench/torchrun_baseline.py",
                           "--config", config, "--loader-workers", "1", "--threads", "1", *args], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.time() - launched
    if proc.returncode != 0:
        raise RuntimeError(f"the torchrun script failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    out = windows_summary(lines[0]["time"], launched, [line["samples_per_s"] for line in lines], window, batch)
    return {**out, "wall_s": round(wall, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", nargs="+", choices=sorted(JOBS), default=["pformer", "qformer"])
    parser.add_argument("--reps", type=int, default=2, help="A B pairs per stage (A B A B ...)")
    parser.add_argument("--steps", type=int, default=200, help="training steps per run")
    parser.add_argument("--window", type=int, default=25, help="steps per logging window")
    args = parser.parse_args()

    from app.data.shards import load_captions_json, make_shards
    from app.demo.assets import prepare_demo_assets

    assets = prepare_demo_assets(ROOT / ".demo")
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs"
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        shards = tmp / "flickr_shards"
        make_shards(str(FLICKR / "images"), load_captions_json(FLICKR / "captions.json"), str(shards), shard_size=250)
        for stage in args.stages:
            results: dict[str, list[dict]] = {"ray": [], "torchrun": []}
            for rep in range(args.reps):
                for side in ("ray", "torchrun"):
                    run_args = overrides(stage, assets, shards, tmp, args.steps, args.window, f"{stage}-{side}-{rep}")
                    batch = int(next(a.split("=")[1] for a in run_args if a.startswith("train.batch_size_per_worker=")))
                    result = (run_ray(stage, run_args, tmp, args.window, batch) if side == "ray"
                              else run_torchrun(stage, run_args, args.window, batch))
                    results[side].append(result)
                    print(json.dumps({"bench": "vs_torchrun", "stage": stage, "side": side, "rep": rep, "batch": batch,
                                      "steps": args.steps, **result}), flush=True)
            pairs = [r["steady_samples_per_s"] / t["steady_samples_per_s"]
                     for r, t in zip(results["ray"], results["torchrun"])]
            print(json.dumps({
                "bench": "vs_torchrun", "stage": stage, "machine": machine,
                "ray_over_torchrun_steady": [round(p, 3) for p in pairs],
                "mean_ratio": round(sum(pairs) / len(pairs), 3),
                "startup_s": {side: [r["startup_s"] for r in rs] for side, rs in results.items()}}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
