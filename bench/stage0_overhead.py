"""Stage-0 overhead of the full Ray job against a plain PyTorch loop, measured in one run.

    python bench/stage0_overhead.py [--steps 300] [--batch-size 64] [--threads 1]

Both sides train the same tiny P-Former + tiny OPT (the embedded default's models, prepared if
missing) at the same batch size and torch thread count. The plain loop iterates pre-tokenized
batches in one process; the Ray job streams the corpus through Ray Data (read, clean, tokenize)
into a 1-worker TorchTrainer with MLflow logging and checkpoints. Throughput is the steady state:
the first logging window (start-up, worker imports) is left out on both sides.
Prints one JSON line; record it in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def plain_loop(cfg, steps: int, warmup: int) -> float:
    import numpy as np
    import torch

    from app.data.text import preprocess_text_batch
    from app.data.captions import trim_padding
    from app.losses import stage_losses
    from app.stages import PFormerStage
    from app.train.optim import build_optimizer, build_scheduler

    lines = Path(cfg.data.text).read_text().splitlines()
    batch_size = cfg.train.batch_size_per_worker
    batches = []
    for i in range(steps + warmup):  # tokenized up front: the plain loop pays no data cost while timed
        texts = [lines[(i * batch_size + j) % len(lines)] for j in range(batch_size)]
        raw = {"text": np.array(texts, dtype=object), "problem": np.array([None] * batch_size, dtype=object)}
        arrays = preprocess_text_batch(raw, pformer_tokenizer=cfg.model.pformer, llm_tokenizer=cfg.model.llm,
                                       llm_is_encoder_decoder=False, max_chars=cfg.data.max_chars,
                                       max_txt_len=cfg.data.max_txt_len, seed=i)
        batches.append({k: torch.from_numpy(v).long() for k, v in arrays.items()})
    torch.manual_seed(0)
    model = PFormerStage().build_model(cfg)
    model.train()
    optimizer = build_optimizer(model.trainable_parameters(), cfg.train.lr, cfg.train.weight_decay, cfg.train.betas)
    scheduler = build_scheduler(optimizer, cfg.train)
    params = list(model.trainable_parameters())
    start = None
    for i, batch in enumerate(batches):
        if i == warmup:
            start = time.perf_counter()
        losses = stage_losses(model, trim_padding(batch))
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    return steps * batch_size / (time.perf_counter() - start)


def ray_job(cfg) -> tuple[float, dict]:
    from mlflow.tracking import MlflowClient

    from app.train.launcher import run_stage

    summary = run_stage(cfg)
    history = sorted(MlflowClient(cfg.mlflow.tracking_uri).get_metric_history(summary["mlflow_run_id"], "steps_per_s"),
                     key=lambda m: m.step)
    steady = history[1:]  # the first window includes worker start-up
    window = cfg.train.log_every_steps
    seconds = sum(window / m.value for m in steady)
    return len(steady) * window * cfg.train.batch_size_per_worker / seconds, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on both sides (= CPUs per Ray worker)")
    parser.add_argument("--shuffle-buffer-rows", type=int, default=10_000, help="the Ray job's local shuffle buffer")
    args = parser.parse_args()

    import torch

    from app.config import load_config
    from app.demo.assets import prepare_demo_assets

    assets = prepare_demo_assets(ROOT / ".demo")
    torch.set_num_threads(args.threads)
    window = 25
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(ROOT / "configs" / "tiny" / "demo_stage0.yaml", [
            f"data.text={assets['text']}", f"model.pformer={assets['bert']}", f"model.llm={assets['opt']}",
            f"train.max_steps={args.steps + window}", f"train.batch_size_per_worker={args.batch_size}",
            f"train.log_every_steps={window}", f"train.checkpoint_every_steps={args.steps + window}",
            f"scaling.cpus_per_worker={args.threads}", f"run.storage_path={tmp}/ckpt",
            f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db", "run.name=bench-stage0",
            f"data.shuffle_buffer_rows={args.shuffle_buffer_rows}"])
        plain = plain_loop(cfg, args.steps, warmup=window)
        ray_rate, _ = ray_job(cfg)
    result = {"bench": "stage0_overhead", "machine": f"{platform.machine()} {os.cpu_count()} cpus",
              "torch_threads": args.threads, "batch_size": args.batch_size, "steps": args.steps,
              "shuffle_buffer_rows": args.shuffle_buffer_rows,
              "plain_samples_per_s": round(plain, 1), "ray_samples_per_s": round(ray_rate, 1),
              "ratio": round(ray_rate / plain, 3)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
