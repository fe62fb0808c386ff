"""Data scaling: P-Former vs BLIP-2 as image-text pairs get scarce, on the embedded default's scene world.

    python bench/data_scaling.py                          # the OPT-style grid: 5 sizes x 2 arms x 3 seeds
    python bench/data_scaling.py --llm t5 --pictures auto # the T5-style LLM at the size where OPT differs most
    python bench/data_scaling.py --report                 # table and plot from the JSON, no training
    python bench/data_scaling.py --dry-run                # the plan: what would run, what is done

The protocol is written in bench/RESULTS.md ("Data scaling"). Text is abundant (stage 0 on the demo's
50,000-caption corpus, once per seed); image-text pairs are scarce: stages 1 and 2 train on the first N
training pictures (`common.data.train_pictures`, nested subsets in file order), with the same steps and
batch at every N. Every (llm, arm, N, seed) is one `jobs.pipeline` run (arm `pformer`: the paper's align
weights 10 and 100; `blip2`: weight 0, no P-Former), scored on a held-out test set of pictures whose
scenes appear in neither the training nor the validation pictures (`demo.num_test_images`).

Resumable: each finished run is written to the JSON (default bench/data_scaling.json) at once, and a
restart skips it; a failed run is recorded under `failures` and tried again on the next start. MLflow:
one parent run per LLM kind (experiment `pformer-data-scaling`), with every stage-0 run and every
pipeline run (its stages and evaluation below it) as children; the table and the plot are logged to it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PICTURES = (125, 250, 500, 1000, 2000)
SEEDS = (0, 1, 2)
ARMS = ("pformer", "blip2")
METRICS = ("CIDEr", "Bleu_4", "METEOR", "ROUGE_L")
TEST_IMAGES = 500
EXPERIMENT = "pformer-data-scaling"


# ---------------------------------------------------------------------------------------------
# bookkeeping (no training)


def run_key(llm: str, arm: str, pictures: int, seed: int) -> str:
    return f"{llm}/{arm}/n{pictures}/s{seed}"


def stage0_key(llm: str, seed: int) -> str:
    return f"{llm}/stage0/s{seed}"


def plan(llm: str, pictures: Iterable[int], seeds: Iterable[int], arms: Iterable[str] = ARMS) -> list[dict[str, Any]]:
    """Every run of the grid, seed by seed (a stopped grid has whole curves for its first seeds)."""
    return [{"llm": llm, "arm": arm, "pictures": n, "seed": seed, "key": run_key(llm, arm, n, seed)}
            for seed in seeds for n in pictures for arm in arms]


def load_results(path: Path) -> dict[str, Any]:
    if path.exists():
        return json.loads(path.read_text())
    return {"runs": {}, "stage0": {}, "failures": [], "parents": {}}


def save_results(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def pending(grid: list[dict[str, Any]], results: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs of `grid` without a finished record (failed ones are tried again)."""
    return [run for run in grid if results["runs"].get(run["key"], {}).get("status") != "finished"]


def _mean_sd(values: list[float]) -> tuple[Optional[float], Optional[float]]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """Per (llm, arm, N): mean and sd over seeds of every metric and of the stage-2 validation LM loss
    (before the first step and at the end); per (llm, N): the paired per-seed difference pformer - blip2
    and whether it is real (|mean| larger than both arms' seed sd, see RESULTS.md)."""
    finished = [r for r in results["runs"].values() if r.get("status") == "finished"]
    cells: dict[tuple[str, str, int], list[dict]] = {}
    for run in finished:
        cells.setdefault((run["llm"], run["arm"], run["pictures"]), []).append(run)
    arms = []
    for (llm, arm, n), runs in sorted(cells.items()):
        row: dict[str, Any] = {"llm": llm, "arm": arm, "pictures": n, "seeds": sorted(r["seed"] for r in runs)}
        for name in METRICS:
            row[name] = _mean_sd([r["metrics"][name] for r in runs if r["metrics"].get(name) is not None])
        for name in ("val_lm_loss_start", "val_lm_loss_end"):
            row[name] = _mean_sd([r["stage2"][name] for r in runs if r["stage2"].get(name) is not None])
        arms.append(row)
    by_cell = {(r["llm"], r["arm"], r["pictures"]): r for r in arms}
    diffs = []
    for llm, n in sorted({(r["llm"], r["pictures"]) for r in arms}):
        a, b = cells.get((llm, "pformer", n), []), cells.get((llm, "blip2", n), [])
        seeds_b = {r["seed"]: r for r in b}
        paired = [(r["seed"], r["metrics"]["CIDEr"] - seeds_b[r["seed"]]["metrics"]["CIDEr"]) for r in a
                  if r["seed"] in seeds_b]
        if not paired:
            continue
        mean, sd = _mean_sd([d for _, d in paired])
        spreads = [by_cell[(llm, arm, n)]["CIDEr"][1] for arm in ARMS]
        diffs.append({"llm": llm, "pictures": n, "per_seed": dict(sorted(paired)), "mean": mean, "sd": sd,
                      "same_sign": len({d > 0 for _, d in paired}) == 1,
                      "real": len(paired) >= 3 and all(s is not None and abs(mean) > s for s in spreads)})
    baselines = [r["random_baseline"]["CIDEr"] for r in finished if r.get("random_baseline", {}).get("CIDEr") is not None]
    return {"arms": arms, "differences": diffs,
            "random_CIDEr": (min(baselines), max(baselines)) if baselines else None,
            "gap": {llm: gap_statistic(arms, llm) for llm in sorted({r["llm"] for r in arms})},
            "runs_finished": len(finished), "failures": len(results.get("failures", [])),
            "seconds": round(sum(r.get("seconds", 0) for r in finished)
                             + sum(s.get("seconds", 0) for s in results.get("stage0", {}).values()), 1)}


def gap_statistic(arms: list[dict[str, Any]], llm: str, reference: int = max(PICTURES)) -> Optional[int]:
    """The smallest N at which `pformer`'s mean CIDEr reaches `blip2`'s mean CIDEr at N = `reference`
    (None when it never does, or the reference cell is missing)."""
    target = next((r["CIDEr"][0] for r in arms if (r["llm"], r["arm"], r["pictures"]) == (llm, "blip2", reference)), None)
    if target is None:
        return None
    reached = sorted(r["pictures"] for r in arms if r["llm"] == llm and r["arm"] == "pformer"
                     and r["CIDEr"][0] is not None and r["CIDEr"][0] >= target)
    return reached[0] if reached else None


def largest_difference(results: dict[str, Any], llm: str = "opt") -> int:
    """The N at which the `llm` curve's mean paired difference pformer - blip2 is largest in size."""
    diffs = [d for d in summarise(results)["differences"] if d["llm"] == llm]
    if not diffs:
        raise SystemExit(f"no finished {llm} pairs in the results yet: run the {llm} grid first")
    return max(diffs, key=lambda d: abs(d["mean"]))["pictures"]


def _fmt(pair: Optional[tuple[Optional[float], Optional[float]]], digits: int = 3) -> str:
    if not pair or pair[0] is None:
        return "-"
    return f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"


def format_markdown(summary: dict[str, Any]) -> str:
    lines = ["| LLM | arm | N pictures | seeds | CIDEr | BLEU-4 | METEOR | ROUGE-L | stage-2 val LM loss, step 0 | stage-2 val LM loss, end |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in summary["arms"]:
        lines.append(f"| {r['llm']} | {r['arm']} | {r['pictures']} | {len(r['seeds'])} | {_fmt(r['CIDEr'])} | "
                     f"{_fmt(r['Bleu_4'])} | {_fmt(r['METEOR'])} | {_fmt(r['ROUGE_L'])} | "
                     f"{_fmt(r['val_lm_loss_start'])} | {_fmt(r['val_lm_loss_end'])} |")
    lines += ["", "| LLM | N pictures | CIDEr pformer - blip2, per seed | mean ± sd | same sign | real (> both arms' sd) |",
              "| --- | --- | --- | --- | --- | --- |"]
    for d in summary["differences"]:
        per_seed = ", ".join(f"s{s}: {v:+.3f}" for s, v in d["per_seed"].items())
        lines.append(f"| {d['llm']} | {d['pictures']} | {per_seed} | {d['mean']:+.3f} ± {d['sd']:.3f} | "
                     f"{'yes' if d['same_sign'] else 'no'} | {'yes' if d['real'] else 'no'} |")
    band = summary["random_CIDEr"]
    lines += ["", f"Random-caption baseline CIDEr on the test set (one per run seed): "
                  f"{band[0]:.3f} - {band[1]:.3f}" if band else "", ""]
    for llm, gap in summary["gap"].items():
        lines.append(f"Gap statistic ({llm}): the smallest N at which pformer reaches blip2's mean CIDEr at "
                     f"N = {max(PICTURES)}: {gap if gap is not None else 'none (never reached)'}")
    lines.append(f"\nFinished runs: {summary['runs_finished']}; failed attempts: {summary['failures']}; "
                 f"training and evaluation time: {summary['seconds'] / 60:.1f} min")
    return "\n".join(lines) + "\n"


def _pictures_axis(ax, label: str) -> None:
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(PICTURES, [str(n) for n in PICTURES])
    ax.set_xlabel(label)


def plot(summary: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"pformer": ("tab:blue", "o"), "blip2": ("tab:orange", "s")}
    for (llm, arm) in sorted({(r["llm"], r["arm"]) for r in summary["arms"]}):
        rows = sorted((r for r in summary["arms"] if (r["llm"], r["arm"]) == (llm, arm)), key=lambda r: r["pictures"])
        colour, marker = styles.get(arm, ("gray", "x"))
        left.errorbar([r["pictures"] for r in rows], [r["CIDEr"][0] for r in rows], yerr=[r["CIDEr"][1] for r in rows],
                      color=colour, marker=marker, capsize=3, linestyle="-" if llm == "opt" else "none",
                      markerfacecolor=colour if llm == "opt" else "none", label=f"{arm} ({llm.upper()}-style LLM)")
    if summary["random_CIDEr"]:
        low, high = summary["random_CIDEr"]
        left.axhspan(low, max(high, low + 1e-3), color="gray", alpha=0.25, label="random captions")
    _pictures_axis(left, "training pictures N (2 captions each; log scale)")
    left.set_ylabel("CIDEr on the held-out test pictures")
    left.set_title("caption quality vs image-text pairs (mean ± sd over seeds)")
    left.legend(fontsize=8)
    for llm in sorted({d["llm"] for d in summary["differences"]}):
        rows = [d for d in summary["differences"] if d["llm"] == llm]
        for d in rows:
            right.scatter([d["pictures"]] * len(d["per_seed"]), list(d["per_seed"].values()), s=14,
                          color="tab:green" if llm == "opt" else "tab:purple", alpha=0.6)
        right.errorbar([d["pictures"] for d in rows], [d["mean"] for d in rows], yerr=[d["sd"] for d in rows],
                       color="tab:green" if llm == "opt" else "tab:purple", marker="D", capsize=3,
                       linestyle="-" if llm == "opt" else "none", label=f"mean ± sd ({llm.upper()}-style)")
    right.axhline(0, color="black", linewidth=0.8)
    _pictures_axis(right, "training pictures N (log scale)")
    right.set_ylabel("CIDEr: pformer - blip2 (same seed)")
    right.set_title("paired difference per seed (dots)")
    right.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)
    return path


def write_report(results: dict[str, Any], json_path: Path) -> tuple[Path, Path]:
    summary = summarise(results)
    table = json_path.with_suffix(".md")
    table.write_text(format_markdown(summary))
    return table, plot(summary, json_path.with_suffix(".png"))


# ---------------------------------------------------------------------------------------------
# running


def _history_ends(uri: str, run_id: str, key: str) -> tuple[Optional[float], Optional[float]]:
    from app import tracking

    history = sorted(tracking.client(uri).get_metric_history(run_id, key), key=lambda m: m.step)
    if not history:
        return None, None
    return (history[0].value if history[0].step == 0 else None), history[-1].value


def _overrides(args, llm: str) -> list[str]:
    # Equal compute: train.max_steps ends every stage; no epoch cap may stop a small-N run early.
    out = ["common.train.epochs=100000", f"demo.num_test_images={args.test_images}", f"demo.root={args.root}",
           f"common.mlflow.experiment={args.experiment}", f"common.run.storage_path={args.storage}",
           f"pipeline.eval_batch_size={args.eval_batch_size}"]
    if args.eval == "test":
        out += [f"pipeline.eval_data={args.root}/shards/test", "pipeline.eval_limit=null"]
    if llm == "t5":
        out += ["demo.llms=[opt, t5]", f"common.model.llm={args.root}/models/t5"]
    return out + list(args.overrides)


def run_grid(args, llm: str, pictures: list[int]) -> dict[str, Any]:
    from app import tracking
    from app.demo.assets import prepare_demo_assets
    from app.pipeline import load_pipeline_config, run_pipeline
    from app.train.launcher import init_ray, resolve_paths

    json_path = Path(args.out)
    results = load_results(json_path)
    if args.reuse_stage0:
        for key, value in load_results(Path(args.reuse_stage0))["stage0"].items():
            results["stage0"].setdefault(key, value)
    results.setdefault("evaluated_on", args.eval)
    if results["evaluated_on"] != args.eval:
        raise SystemExit(f"{json_path} holds runs evaluated on {results['evaluated_on']}, not {args.eval}: use another --out")
    grid = plan(llm, pictures, args.seeds, args.arms)
    todo = pending(grid, results)
    base = _overrides(args, llm)
    config = load_pipeline_config(args.config, base)
    print(f"[scaling] {llm}: {len(grid)} runs in the grid, {len(grid) - len(todo)} finished, {len(todo)} to run",
          flush=True)
    if not todo:
        return results
    print(f"[scaling] demo assets in {config.demo.root} (generated on the first run, then reused)", flush=True)
    assets = prepare_demo_assets(**config.demo.model_dump())
    test_ready = json.loads((Path(assets["test"]).parent / "READY_test.json").read_text())
    results["test_set"] = {k: test_ready[k] for k in ("kept", "dropped", "excluded_scenes", "two_object_pictures")}
    stage0_cfg = resolve_paths(config.stage_config("stage0"))
    uri = stage0_cfg.mlflow.tracking_uri
    init_ray(stage0_cfg)
    client = tracking.client(uri)
    parent = results["parents"].get(llm)
    if parent is None:
        parent = tracking.create_run(uri, args.experiment, f"data-scaling-{llm}{args.label and '-' + args.label}",
                                     {"stage": "data-scaling", "llm": llm, "evaluated_on": args.eval})
        results["parents"][llm] = parent
        save_results(json_path, results)
    else:
        client.update_run(parent, status="RUNNING")
    started = time.time()
    status = "FAILED"
    try:
        for i, run in enumerate(todo, 1):
            seed, arm, n = run["seed"], run["arm"], run["pictures"]
            print(f"[scaling] {i}/{len(todo)} {run['key']} ({time.time() - started:.0f} s elapsed)", flush=True)
            try:
                extra = [f"common.run.seed={seed}", f"common.data.train_pictures={n}", f"pipeline.arms=[{arm}]",
                         f"pipeline.name=ds-{llm}{args.label and '-' + args.label}-{arm}-n{n}-s{seed}",
                         f"pipeline.random_baseline_seed={seed}"]
                if arm == "pformer":
                    extra.append(f"pipeline.stage0_checkpoint={_stage0(results, json_path, config, llm, seed, parent, base, args)}")
                t0 = time.time()
                summary = run_pipeline(load_pipeline_config(args.config, base + extra), parent_run_id=parent,
                                       params={"llm": llm, "arm": arm, "train_pictures": n, "seed": seed})
                res = summary["arms"][arm]
                for stage in ("stage1", "stage2"):
                    wanted = config.stage_config(stage).train.max_steps
                    if res[stage]["step"] != wanted:
                        raise RuntimeError(f"{stage} ended at step {res[stage]['step']}, not train.max_steps={wanted}")
                start, end = _history_ends(uri, res["stage2"]["mlflow_run_id"], "val_lm_loss")
                results["runs"][run["key"]] = {
                    **{k: run[k] for k in ("llm", "arm", "pictures", "seed")}, "status": "finished",
                    "metrics": {k: res["eval"]["metrics"].get(k) for k in METRICS},
                    "random_baseline": {k: summary["random_baseline"].get(k) for k in METRICS},
                    "stage1": {k: res["stage1"]["metrics"].get(k) for k in ("val_loss", "val_itc_loss", "val_itg_loss")},
                    "stage2": {"val_lm_loss_start": start, "val_lm_loss_end": end},
                    "steps": {stage: res[stage]["step"] for stage in ("stage1", "stage2")},
                    "samples_read": {"stage1": res["stage1"]["data"].get("rows_read"),
                                     "stage2": res["stage2"]["data"].get("rows_read")},
                    "mlflow_run_id": summary["parent_run_id"], "seconds": round(time.time() - t0, 1)}
            except Exception as err:  # recorded, reported, tried again on the next start
                print(f"[scaling] {run['key']} failed: {type(err).__name__}: {err}", flush=True)
                results["failures"].append({"key": run["key"], "error": f"{type(err).__name__}: {err}",
                                            "time": time.strftime("%Y-%m-%d %H:%M:%S")})
                results["runs"][run["key"]] = {**{k: run[k] for k in ("llm", "arm", "pictures", "seed")},
                                               "status": "failed", "error": f"{type(err).__name__}: {err}"}
            save_results(json_path, results)
            write_report(results, json_path)
        status = "FINISHED"
    finally:
        table, figure = write_report(results, json_path)
        for path in (table, figure, json_path):
            client.log_artifact(parent, str(path))
        tracking.end_run(uri, parent, status)
    return results


def _stage0(results, json_path, config, llm, seed, parent, base, args) -> str:
    """The seed's stage-0 checkpoint: trained once (resumed by run name if a start was cut short)."""
    from app.pipeline import load_pipeline_config
    from app.train.launcher import run_stage

    key = stage0_key(llm, seed)
    if key not in results["stage0"]:
        t0 = time.time()
        cfg = load_pipeline_config(args.config, base + [f"common.run.seed={seed}"]).stage_config(
            "stage0", **{"run.name": f"ds-{llm}-s{seed}-stage0"})
        out = run_stage(cfg, parent)
        results["stage0"][key] = {"checkpoint": out["checkpoint"], "mlflow_run_id": out["mlflow_run_id"],
                                  "metrics": out["metrics"], "seconds": round(time.time() - t0, 1)}
        save_results(json_path, results)
    return results["stage0"][key]["checkpoint"]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"), help="pipeline config (the demo's)")
    parser.add_argument("--llm", choices=("opt", "t5"), default="opt")
    parser.add_argument("--pictures", nargs="+", default=[str(n) for n in PICTURES],
                        help="training-picture counts N, or `auto`: the N where the OPT curve differs most")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--out", default=str(ROOT / "bench" / "data_scaling.json"))
    parser.add_argument("--root", default=".demo", help="demo assets folder")
    parser.add_argument("--storage", default="./checkpoints/data-scaling", help="checkpoint folder of the runs")
    parser.add_argument("--experiment", default=EXPERIMENT, help="MLflow experiment")
    parser.add_argument("--test-images", type=int, default=TEST_IMAGES)
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--eval", choices=("test", "val"), default="test",
                        help="score on the held-out test pictures (the report) or on the 200 validation pictures "
                             "(for choosing anything: weights, steps, decoding)")
    parser.add_argument("--reuse-stage0", metavar="JSON", help="take the stage-0 checkpoints recorded in another results file")
    parser.add_argument("--label", default="", help="added to the MLflow run names (a variant's name)")
    parser.add_argument("--eval-batch-size", type=int, default=100)
    parser.add_argument("--report", action="store_true", help="only write the table and the plot from --out")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and what is finished")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="section.key=value",
                        help="a pipeline config override (repeatable), e.g. --set stage1.train.max_steps=50")
    args = parser.parse_args(argv)
    json_path = Path(args.out)
    if args.report:
        table, figure = write_report(load_results(json_path), json_path)
        print(table.read_text())
        print(f"[scaling] table {table}, plot {figure}")
        return 0
    if args.pictures == ["auto"]:
        pictures = [largest_difference(load_results(json_path))]
        print(f"[scaling] --pictures auto: N = {pictures[0]} (the largest mean OPT-style difference)", flush=True)
    else:
        pictures = [int(n) for n in args.pictures]
    if args.dry_run:
        results = load_results(json_path)
        for run in plan(args.llm, pictures, args.seeds, args.arms):
            state = results["runs"].get(run["key"], {}).get("status", "to run")
            print(f"{run['key']}: {state}")
        return 0
    run_grid(args, args.llm, pictures)
    table, figure = write_report(load_results(json_path), json_path)
    print(table.read_text())
    print(f"[scaling] table {table}, plot {figure}; MLflow experiment {args.experiment}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
