"""Diagnostics of the embedded demo world: can it show what image-text pairs do?

    python bench/demo_diagnostics.py --summary outputs/demo_summary.json           # after `make demo`
    python bench/demo_diagnostics.py --summary outputs/demo_summary.json --curve 100 300 600 1200

From a finished demo pipeline (its `--summary` JSON) and the assets under `.demo/`:

- caption metrics of the ceiling (the grammar's own caption of each true scene, a fresh template draw,
  scored against the picture's references like a model's caption) and of the floor (each picture captioned
  with another picture's reference), on the validation pictures the pipeline scored;
- a linear probe of the frozen vision tower's output tokens (flattened) for every attribute the captions
  name, fitted on 2,400 drawn pictures of other scenes and scored on 600 more; the same for a random
  (untrained) tower of the same shape, for contrast;
- per-attribute accuracy of each arm's generated captions (attribute words parsed with the grammar's
  vocabulary: the share true of the picture, the share of pictures whose caption names the attribute);
- the stage-0 P-Former's own quality: on 1,000 held-out captions (drawn with another seed, none in the
  corpus), how often the frozen LLM given only the P-Former's prompt regenerates the caption exactly, its
  teacher-forced token accuracy, and the stage-0 LM loss against steps (from MLflow);
- `--curve S1 S2 ...`: the BLIP-2 arm's validation CIDEr against stage-2 steps (stage 1 as the demo's, then
  one stage-2 run to the largest S with a checkpoint at each S, each scored like the pipeline's captions).

Writes `--out` (JSON, default bench/demo_diagnostics.json) and prints a Markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def floor_and_ceiling(root: Path, split: str, seed: int = 0) -> dict:
    from app.demo.assets import load_scenes
    from app.demo.diagnostics import grammar_ceiling
    from app.pipeline import random_caption_baseline

    images = root / "images" / split
    scenes = load_scenes(images)
    listing = json.loads((images / "captions.json").read_text())
    references = {Path(name).stem: texts for name, texts in listing.items()}
    rows = [{"id": key, "references": texts} for key, texts in sorted(references.items())]
    return {"pictures": len(rows), "ceiling": grammar_ceiling(scenes, references, seed),
            "floor": random_caption_baseline(rows, seed)}


def probe(vision: str, seed: int = 0) -> dict:
    from app.demo.assets import DEMO_VISION_PATCH, DEMO_VISION_SIZE, IMAGE_SIZE
    from app.demo.probe import probe_tower, tower_features
    from app.models.tiny import build_tiny_vision

    out = {"trained": probe_tower(tower_features(vision, IMAGE_SIZE))}
    with tempfile.TemporaryDirectory() as folder:
        build_tiny_vision(folder, kind="blip2", image_size=DEMO_VISION_SIZE, patch_size=DEMO_VISION_PATCH, hidden=64,
                          seed=seed)
        out["random"] = probe_tower(tower_features(folder, IMAGE_SIZE))
    return out


def held_out_captions(corpus_path: Path, count: int = 1000, seed: int = 999) -> list[str]:
    from app.demo.shapes import caption, random_scene

    seen = set(corpus_path.read_text().splitlines())
    rng, out = random.Random(seed), []
    while len(out) < count:
        text = caption(random_scene(rng), rng)
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def stage0_quality(summary: dict, corpus_path: Path) -> dict:
    from app import tracking
    from app.evaluation.reconstruction import pformer_reconstruction

    stage0 = summary["stage0"]
    found = pformer_reconstruction(stage0["checkpoint"], held_out_captions(corpus_path))
    client = tracking.client(summary["tracking_uri"])
    found["lm_loss_by_step"] = [(m.step, round(m.value, 4)) for m in
                                sorted(client.get_metric_history(stage0["mlflow_run_id"], "lm_loss"), key=lambda m: m.step)]
    return found


def arm_attributes(summary: dict, root: Path, split: str) -> dict:
    from app.demo.assets import load_scenes
    from app.demo.diagnostics import caption_attributes_report

    scenes = load_scenes(root / "images" / split)
    out = {}
    for arm, res in summary["arms"].items():
        results = next(f for f in res["eval"]["files"] if f.endswith("results.json"))
        out[arm] = caption_attributes_report(json.loads(Path(results).read_text()), scenes)
    return out


def steps_curve(config: str, steps: list[int], overrides: list[str]) -> list[dict]:
    """The BLIP-2 arm: stage 1 as the pipeline's, then stage 2 to max(steps) with a checkpoint at each."""
    import math

    from app import storage
    from app.evaluation.inference import InferenceSettings
    from app.evaluation.model import GenerationOptions
    from app.evaluation.tasks import EvalRun, EvalSource, evaluate_captions
    from app.pipeline import load_pipeline_config
    from app.train.launcher import run_stage

    every = math.gcd(*steps)
    name = f"curve-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg = load_pipeline_config(config, overrides)
    stage1 = run_stage(cfg.stage_config("stage1", **{"run.name": f"{name}-stage1", "loss.align_weight": 0,
                                                      "init_from.pformer": None}))
    stage2_cfg = cfg.stage_config("stage2", **{
        "run.name": f"{name}-stage2", "loss.align_weight": 0, "init_from.pformer": None,
        "init_from.qformer": stage1["checkpoint"], "train.max_steps": max(steps), "train.epochs": 100000,
        "train.checkpoint_every_steps": every, "train.num_checkpoints_to_keep": max(steps) // every + 1})
    stage2 = run_stage(stage2_cfg)
    p, run_dir = cfg.pipeline, Path(stage2["checkpoint"]).parent
    out = []
    for step in steps:
        run = EvalRun(checkpoint=str(run_dir / f"checkpoint_{step:08d}"), out_dir=tempfile.mkdtemp(),
                      settings=InferenceSettings(batch_size=p.eval_batch_size, num_actors=1), log_mlflow=False,
                      s3=storage.S3Options.from_config(stage2_cfg), grid_size=0)
        found = evaluate_captions(run, EvalSource(data=p.eval_data or stage2_cfg.data.val, limit=p.eval_limit),
                                  GenerationOptions(num_beams=p.num_beams, max_new_tokens=p.max_new_tokens,
                                                    min_new_tokens=p.min_new_tokens), spice=False)
        out.append({"stage2_step": step, "CIDEr": found["metrics"]["CIDEr"], "Bleu_4": found["metrics"]["Bleu_4"]})
        print(f"[diagnostics] stage-2 step {step}: CIDEr {found['metrics']['CIDEr']:.3f}", flush=True)
    return out


def markdown(report: dict) -> str:
    lines = []
    fc = report["floor_and_ceiling"]
    lines += [f"Caption metrics on the {fc['pictures']} {report['split']} pictures:", "",
              "| captions | CIDEr | BLEU-4 | METEOR | ROUGE-L |", "| --- | --- | --- | --- | --- |"]
    rows = [("grammar's own, true scene (ceiling)", fc["ceiling"]), ("another picture's (floor)", fc["floor"])]
    rows += [(f"arm `{arm}`", m) for arm, m in report.get("arm_metrics", {}).items()]
    for label, m in rows:
        lines.append(f"| {label} | {m['CIDEr']:.3f} | {m['Bleu_4']:.3f} | {m['METEOR']:.3f} | {m['ROUGE_L']:.3f} |")
    kinds = list(report["probe"]["trained"]["attributes"])
    lines += ["", "Linear probe of the frozen tower's tokens (held-out accuracy):", "",
              "| tower | " + " | ".join(kinds) + " |", "| --- |" + " --- |" * len(kinds)]
    for tower in ("trained", "random"):
        values = report["probe"][tower]["attributes"]
        lines.append(f"| {tower} | " + " | ".join(f"{values[k]:.3f}" for k in kinds) + " |")
    kinds = ["color", "shape", "size", "position", "background", "relation"]
    lines += ["", "Attribute words of the generated captions: true of the picture / pictures named:", "",
              "| arm | " + " | ".join(kinds) + " |", "| --- |" + " --- |" * len(kinds)]
    for arm, values in report["attributes"].items():
        cells = [("-" if values[k]["true"] is None else f"{values[k]['true']:.2f}") + f" / {values[k]['named']:.2f}"
                 for k in kinds]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    s0 = report["stage0"]
    lines += ["", f"Stage-0 P-Former on {s0['captions']} held-out captions: exact regeneration {s0['exact']:.3f}, "
                  f"token accuracy {s0['token_accuracy']:.3f}; LM loss by step: "
                  + ", ".join(f"{s}: {v}" for s, v in s0["lm_loss_by_step"])]
    if report.get("curve"):
        lines += ["", "BLIP-2 arm, validation CIDEr by stage-2 step: "
                  + ", ".join(f"{c['stage2_step']}: {c['CIDEr']:.3f}" for c in report["curve"])]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--summary", required=True, help="the demo pipeline's --summary JSON")
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--root", default=".demo")
    parser.add_argument("--curve", nargs="*", type=int, default=[], metavar="STEPS")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="section.key=value")
    parser.add_argument("--out", default=str(ROOT / "bench" / "demo_diagnostics.json"))
    args = parser.parse_args(argv)
    summary = json.loads(Path(args.summary).read_text())
    root = Path(args.root)
    split = "val"
    started = time.time()
    report = {"machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPUs", "split": split,
              "summary": args.summary, "floor_and_ceiling": floor_and_ceiling(root, split),
              "arm_metrics": {arm: res["eval"]["metrics"] for arm, res in summary["arms"].items()},
              "attributes": arm_attributes(summary, root, split)}
    print("[diagnostics] probing the frozen tower", flush=True)
    report["probe"] = probe(str(root / "models" / "vision"))
    if summary.get("stage0") and summary["stage0"].get("mlflow_run_id"):
        print("[diagnostics] measuring the stage-0 P-Former's reconstruction", flush=True)
        report["stage0"] = stage0_quality(summary, root / "text" / "corpus.txt")
    if args.curve:
        report["curve"] = steps_curve(args.config, sorted(args.curve), args.overrides)
    report["seconds"] = round(time.time() - started, 1)
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    print(markdown(report))
    print(f"[diagnostics] {args.out} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
