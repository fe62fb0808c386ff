"""Do runs repeat with their seed? The same short stage-1 run launched twice with one seed and once with
another, in each execution mode, and the largest difference between their logged loss histories.

    python bench/repeatability.py [--modes local,1,2] [--steps 30] [--preserve-order true|false]

Stage 1 (ITC + ITM + ITG, no alignment) on the embedded default's drawn pictures (`.demo/shards/train`, 8
shard files read in parallel, a local shuffle buffer), with the tiny models of `.demo/` (made by
`python -m jobs.prepare_demo` if missing). Modes: `local` (scaling.num_workers=0), `1` and `2` Ray Train
workers. Prints one line per mode and a JSON summary: per loss key the largest |same-seed difference| and
|other-seed difference| over the logged steps. Record it in bench/RESULTS.md ("Repeatability").
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def histories(uri: str, run_id: str, keys: list[str]) -> dict[str, list[tuple[int, float]]]:
    from app import tracking

    client = tracking.client(uri)
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


def largest_gap(a: dict, b: dict) -> dict[str, float]:
    out = {}
    for key in a:
        steps = dict(a[key]), dict(b[key])
        common = sorted(set(steps[0]) & set(steps[1]))
        out[key] = max((abs(steps[0][s] - steps[1][s]) for s in common), default=float("nan"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="local,1,2")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--preserve-order", default="true", choices=("true", "false"))
    args = parser.parse_args()

    from app.config import load_config
    from app.demo.assets import prepare_demo_assets
    from app.train.launcher import run_stage

    assets = prepare_demo_assets(ROOT / ".demo")
    keys = ["itc_loss", "itm_loss", "itg_loss", "loss"]
    work = Path(tempfile.mkdtemp(prefix="repeat-"))
    uri = f"sqlite:///{work / 'mlflow.db'}"
    results = {}
    for mode in args.modes.split(","):
        workers = 0 if mode == "local" else int(mode)
        runs = {}
        for label, seed in (("a", 0), ("b", 0), ("other", 1)):
            cfg = load_config(ROOT / "configs" / "tiny" / "stage1.yaml", [
                f"run.name=repeat-{mode}-{label}", f"run.storage_path={work / 'ckpt'}", f"run.seed={seed}",
                f"mlflow.tracking_uri={uri}", "mlflow.experiment=repeatability", f"scaling.num_workers={workers}",
                "scaling.cpus_per_worker=0.5", f"train.max_steps={args.steps}", "train.log_every_steps=5",
                f"train.checkpoint_every_steps={args.steps}", "train.epochs=50", "loss.align_weight=0",
                "init_from.pformer=null", "data.val=null", f"data.preserve_order={args.preserve_order}",
                f"data.train={assets['train']}", f"model.vision={assets['vision']}", f"model.qformer={assets['bert']}",
                f"model.llm={assets['opt']}"])
            runs[label] = histories(uri, run_stage(cfg)["mlflow_run_id"], keys)
        same, other = largest_gap(runs["a"], runs["b"]), largest_gap(runs["a"], runs["other"])
        results[mode] = {"same_seed_max_abs_diff": same, "other_seed_max_abs_diff": other,
                         "final_loss": [runs[k]["loss"][-1][1] for k in ("a", "b", "other")]}
        print(f"[repeat] mode {mode}: same seed max |diff| {max(same.values()):.3g}, other seed "
              f"{max(other.values()):.3g} (final loss {results[mode]['final_loss']})", flush=True)
    print(json.dumps({"machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPUs",
                      "steps": args.steps, "preserve_order": args.preserve_order, "results": results}, indent=1))


if __name__ == "__main__":
    main()
