"""Ray Tune sweeps over any config key: search-space files, their checks, and the sweep driver.

A space file (`tune_spaces/*.yaml`) maps a dotted config key -- the same keys as on the command line --
to exactly one of

    {grid: [v1, v2, ...]}   every value, in every combination with the other grids
    {choice: [v1, ...]}     one value per sample
    {uniform: [lo, hi]}     float in [lo, hi]
    {loguniform: [lo, hi]}  float in [lo, hi], log scale (0 < lo)
    {randint: [lo, hi]}     integer in [lo, hi] (both ends included)

Every candidate value (grid and choice values, both range ends) is checked against the config schema
before any trial starts, and so is whether the stage uses the key at all.

Each trial of a stage sweep is a Tune function that builds and fits the stage's `TorchTrainer` with
`TuneReportCallback`, so Tune sees every logging window and ASHA can stop weak trials early. Each trial
of a pipeline sweep runs stage 0 -> 1 -> 2 -> caption evaluation (one P-Former per trial, so the prompt
length can vary) and reports the caption metrics once at the end.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from app import tracking
from app.config import Config, ConfigError, build_config, read_yaml_mapping

KINDS = ("grid", "choice", "uniform", "loguniform", "randint")

# Keys a stage reads nothing from: sweeping them would train identical trials.
UNUSED_BY_STAGE = {
    "pformer": ("data.train", "data.val", "data.image_format", "data.image_column", "data.caption_column",
                "data.image_size", "data.min_crop_scale", "data.horizontal_flip", "data.val_max_batches",
                "data.train_pictures", "model.vision", "model.vision_dtype", "model.qformer", "model.cross_attention_freq", "model.prompt",
                "init_from.pformer", "init_from.qformer", "loss.align_weight", "loss.itc_weight",
                "loss.itm_weight", "loss.itg_weight", "data.num_frames", "data.train_features", "model.frame_pooling",
                "model.train_ln_vision", "loss.itc_same_image_positives", "cache"),
    "qformer": ("data.text", "data.text_format", "data.text_column", "model.prompt", "init_from.qformer",
                "loss.lm_weight", "loss.contrastive_weight", "loss.vocab_weight", "loss.contrastive_views",
                "loss.mask_prob", "model.llm_dropout_in_training", "cache"),
    "llm": ("data.text", "data.text_format", "data.text_column", "loss.contrastive_weight", "loss.vocab_weight",
            "loss.contrastive_views", "loss.mask_prob", "loss.itc_weight", "loss.itm_weight", "loss.itg_weight",
            "loss.gather_with_grad", "loss.itc_same_image_positives", "model.train_ln_vision", "cache"),
}
# What a stage sweep ranks trials by unless --metric says otherwise: the stage's main loss without the
# alignment term, so trials with different align weights compare on the same quantity.
DEFAULT_METRIC = {"pformer": "lm_loss", "qformer": "itc_loss", "llm": "lm_loss"}
PIPELINE_METRIC = "CIDEr"


@dataclass(frozen=True)
class Dimension:
    key: str
    kind: str
    values: tuple

    def candidates(self) -> tuple:
        """Values to check against the schema: every listed value, or both ends of a range."""
        return self.values

    def describe(self) -> str:
        return f"{self.kind} {list(self.values)}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_space(raw: Any, source: str = "search space") -> list[Dimension]:
    """Validate the mapping of a space file; every problem names the file and the key."""
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{source}: expected a non-empty mapping of dotted config keys to one of "
                          f"{{{', '.join(f'{k}: ...' for k in KINDS)}}}")
    dims = []
    for key, spec in raw.items():
        where = f"{source}: '{key}'"
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
            got = list(spec) if isinstance(spec, dict) else spec
            raise ConfigError(f"{where}: expected exactly one of {', '.join(KINDS)} (got {got!r})")
        kind, values = next(iter(spec.items()))
        if not isinstance(values, list):
            raise ConfigError(f"{where}: {kind} takes a list (got {values!r})")
        if kind in ("grid", "choice"):
            if not values:
                raise ConfigError(f"{where}: empty {kind}: list at least one value")
            if len({json.dumps(v, sort_keys=True, default=str) for v in values}) != len(values):
                raise ConfigError(f"{where}: {kind} lists a value twice: {values}")
        else:
            if len(values) != 2 or not all(_is_number(v) for v in values) or not values[0] < values[1]:
                raise ConfigError(f"{where}: {kind} takes [low, high] with low < high (got {values!r})")
            if kind == "loguniform" and values[0] <= 0:
                raise ConfigError(f"{where}: loguniform needs 0 < low (got {values!r})")
            if kind == "randint" and not all(isinstance(v, int) for v in values):
                raise ConfigError(f"{where}: randint takes integers (got {values!r})")
        dims.append(Dimension(str(key), kind, tuple(values)))
    return dims


def load_space(path: Union[str, Path]) -> list[Dimension]:
    return parse_space(read_yaml_mapping(path), f"search space {path}")


def param_space(dims: list[Dimension]) -> dict[str, Any]:
    """Ray Tune's search space for the dimensions (keys stay dotted)."""
    from ray import tune

    space = {}
    for d in dims:
        if d.kind == "grid":
            space[d.key] = tune.grid_search(list(d.values))
        elif d.kind == "choice":
            space[d.key] = tune.choice(list(d.values))
        elif d.kind == "uniform":
            space[d.key] = tune.uniform(*d.values)
        elif d.kind == "loguniform":
            space[d.key] = tune.loguniform(*d.values)
        else:
            space[d.key] = tune.randint(d.values[0], d.values[1] + 1)  # Tune's upper end is exclusive
    return space


def num_trials(dims: list[Dimension], num_samples: int) -> int:
    """Grids multiply; every grid point is sampled num_samples times."""
    grid = math.prod(len(d.values) for d in dims if d.kind == "grid")
    return grid * num_samples


def _override(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


# ---------------------------------------------------------------------------------------------
# checks before anything runs


def check_stage_space(dims: list[Dimension], raw: dict, overrides: list[str]) -> Config:
    """Every candidate value must make a valid stage config, and the stage must use every key."""
    base = build_config(copy.deepcopy(raw), overrides)  # (build_config writes overrides into the mapping)
    unused = UNUSED_BY_STAGE[base.stage]
    for d in dims:
        if d.key in ("stage", "run.name") or d.key.startswith("mlflow."):
            raise ConfigError(f"search space: '{d.key}' cannot be swept (each trial sets its own run name and "
                              "logs to the sweep's MLflow experiment)")
        if any(d.key == u or d.key.startswith(u + ".") for u in unused):
            raise ConfigError(f"search space: stage '{base.stage}' does not use '{d.key}'; sweeping it would "
                              "train identical trials")
        for value in d.candidates():
            try:
                build_config(copy.deepcopy(raw), [*overrides, f"{d.key}={_override(value)}"])
            except ConfigError as err:
                raise ConfigError(f"search space: '{d.key}' = {value!r}: {err}") from None
    if any(d.key == "model.num_query_tokens" for d in dims) and base.stage in ("qformer", "llm"):
        sources = [k for k, v in (("init_from.pformer", base.init_from.pformer),
                                  ("init_from.qformer", base.init_from.qformer if base.stage == "llm" else None)) if v]
        if sources:
            raise ConfigError(
                f"search space: 'model.num_query_tokens' cannot vary in a stage-{1 if base.stage == 'qformer' else 2} "
                f"sweep that starts from {' and '.join(sources)}: their prompt/query count is fixed. Sweep it "
                "with a pipeline config (python -m jobs.sweep --config configs/demo.yaml --space ...), whose "
                "trials each train their own P-Former and Q-Former, or drop the init_from checkpoints.")
    return base


def check_pipeline_space(dims: list[Dimension], config_path: Optional[str], overrides: list[str]):
    """Pipeline sweeps use the pipeline's keys (`stage1.loss.align_weight`, `common.model.num_query_tokens`)."""
    from app.pipeline import load_pipeline_config

    base = load_pipeline_config(config_path, overrides)
    for d in dims:
        head = d.key.split(".", 1)[0]
        if head == "demo" or d.key.startswith("pipeline.name") or ".mlflow." in d.key or d.key.endswith("run.name"):
            raise ConfigError(f"search space: '{d.key}' cannot be swept in a pipeline sweep")
        stage = {"stage0": "pformer", "stage1": "qformer", "stage2": "llm"}.get(head)
        rest = d.key.split(".", 1)[1] if "." in d.key else ""
        if stage and any(rest == u or rest.startswith(u + ".") for u in UNUSED_BY_STAGE[stage]):
            raise ConfigError(f"search space: stage '{stage}' ({head}) does not use '{rest}'")
        for value in d.candidates():
            try:
                load_pipeline_config(config_path, [*overrides, f"{d.key}={_override(value)}"])
            except ConfigError as err:
                raise ConfigError(f"search space: '{d.key}' = {value!r}: {err}") from None
    return base


# ---------------------------------------------------------------------------------------------
# running


def _trial_overrides(params: dict[str, Any]) -> list[str]:
    return [f"{k}={_override(v)}" for k, v in sorted(params.items())]


def _stage_trial(params: dict[str, Any], *, raw: dict, overrides: list[str], sweep: str, parent: str) -> None:
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from app.train.launcher import run_stage

    trial_id = tune.get_context().get_trial_id()
    cfg = build_config(copy.deepcopy(raw), [*overrides, *_trial_overrides(params), f"run.name={sweep}-{trial_id}"])
    summary = run_stage(cfg, parent_run_id=parent, callbacks=[TuneReportCallback()],
                        tags={"sweep": sweep, "trial_id": trial_id})
    step = summary["metrics"].get("step") or summary.get("step") or cfg.train.max_steps
    tune.report({**summary["metrics"], "step": step, "checkpoint": summary["checkpoint"],
                 "mlflow_run_id": summary["mlflow_run_id"], "run_name": cfg.run.name})


def _pipeline_trial(params: dict[str, Any], *, config_path: Optional[str], overrides: list[str], sweep: str,
                    parent: str, out_dir: str) -> None:
    from ray import tune

    from app.pipeline import load_pipeline_config, run_pipeline

    trial_id = tune.get_context().get_trial_id()
    config = load_pipeline_config(config_path, [*overrides, *_trial_overrides(params), f"pipeline.name={sweep}-{trial_id}"])
    summary = run_pipeline(config, str(Path(out_dir) / trial_id), parent_run_id=parent, params=params)
    arm = "pformer" if "pformer" in summary["arms"] else next(iter(summary["arms"]))
    result = summary["arms"][arm]
    metrics = {k: v for k, v in result["eval"]["metrics"].items() if isinstance(v, (int, float))}
    tune.report({**metrics, "checkpoint": result["stage2"]["checkpoint"], "mlflow_run_id": summary["parent_run_id"],
                 "run_name": summary["invocation"]})


def single_host() -> bool:
    """Every alive Ray node runs on this machine (a local instance, or a test cluster of several nodes)."""
    import ray

    here = ray.util.get_node_ip_address()
    return all(node["NodeManagerAddress"] == here for node in ray.nodes() if node.get("Alive"))


def max_concurrent_trials(cpus: float, gpus: float, per_trial_cpus: float, per_trial_gpus: float) -> int:
    """As many trials as the cluster's resources hold at once: each needs its trainer workers plus one CPU
    for Ray Data, so data loading is never starved (on a 2-CPU machine: one trial at a time)."""
    by_cpu = int(cpus // (per_trial_cpus + 1)) if per_trial_cpus else 10**6
    by_gpu = int(gpus // per_trial_gpus) if per_trial_gpus else 10**6
    return max(1, min(by_cpu, by_gpu))


@dataclass
class SweepSettings:
    num_samples: int = 1
    scheduler: str = "fifo"          # or "asha"
    metric: Optional[str] = None     # default: DEFAULT_METRIC[stage] (stage sweeps), CIDEr (pipeline sweeps)
    mode: Optional[str] = None       # default: min for losses, max for caption metrics
    max_concurrent: Optional[int] = None
    grace_period: int = 1            # ASHA: logging windows (at least max_steps/4) before a trial can be stopped
    name: Optional[str] = None


def run_sweep(dims: list[Dimension], settings: SweepSettings, *, config_path: Optional[str], overrides: list[str],
              pipeline: bool, out_dir: Optional[str] = None) -> dict[str, Any]:
    """Check the space, run the trials with Ray Tune, log the sweep to MLflow; returns the summary."""
    import ray
    from ray import tune

    from app.train.launcher import init_ray, resolve_paths

    if pipeline:
        base_pipeline = check_pipeline_space(dims, config_path, overrides)
        base = resolve_paths(base_pipeline.stage_config("stage1"))
        stage_label, raw = "pipeline", None
        metric = settings.metric or PIPELINE_METRIC
        if settings.scheduler == "asha":
            raise ConfigError("--scheduler asha needs results while trials run; a pipeline trial reports its "
                              "caption metrics once, at the end (use a stage config for ASHA)")
    else:
        raw = read_yaml_mapping(config_path) if config_path else {}
        base = resolve_paths(check_stage_space(dims, raw, overrides))
        stage_label = base.stage
        metric = settings.metric or DEFAULT_METRIC[base.stage]
    mode = settings.mode or ("min" if "loss" in metric else "max")
    if settings.scheduler not in ("fifo", "asha"):
        raise ConfigError(f"--scheduler: unknown scheduler {settings.scheduler!r} (fifo or asha)")
    trials = num_trials(dims, settings.num_samples)
    name = settings.name or f"sweep-{stage_label}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(out_dir or Path("outputs") / name).resolve()
    out.mkdir(parents=True, exist_ok=True)

    uri, experiment = base.mlflow.tracking_uri, base.mlflow.experiment
    client = tracking.client(uri)
    parent = client.create_run(tracking.experiment_id(uri, experiment), run_name=name,
                               tags={"stage": "sweep", "sweep_of": stage_label, "metric": metric, "mode": mode}).info.run_id
    from mlflow.entities import Param

    client.log_batch(parent, params=[Param(f"space.{d.key}", d.describe()[:500]) for d in dims] + [
        Param("num_samples", str(settings.num_samples)), Param("scheduler", settings.scheduler),
        Param("trials", str(trials)), Param("config", str(config_path))])
    print(f"[sweep] {name}: {trials} trial(s) over {', '.join(d.key for d in dims)}; ranking by {metric} ({mode}); "
          f"MLflow parent run {parent} at {uri}", flush=True)

    status = "FAILED"
    started = time.time()
    try:
        # Trials keep the job's working directory (Tune would move each into its trial folder), so relative
        # paths in configs resolve the same as for a plain run; Tune passes this on to the trial processes.
        os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
        init_ray(base)
        resources = dict(ray.cluster_resources())
        if single_host():  # a local instance advertises more logical CPUs than the machine has cores
            resources["CPU"] = min(resources.get("CPU", 1), os.cpu_count() or 1)
        per_cpus = base.scaling.num_workers * base.scaling.cpus_per_worker
        per_gpus = base.scaling.num_workers if base.scaling.use_gpu else 0
        concurrent = settings.max_concurrent or max_concurrent_trials(resources.get("CPU", 1), resources.get("GPU", 0),
                                                                      per_cpus, per_gpus)
        print(f"[sweep] up to {concurrent} trial(s) at once ({resources.get('CPU', 0):g} CPUs, "
              f"{resources.get('GPU', 0):g} GPUs in the cluster)", flush=True)
        if pipeline:
            fn = tune.with_parameters(_pipeline_trial, config_path=config_path, overrides=overrides, sweep=name,
                                      parent=parent, out_dir=str(out))
        else:
            fn = tune.with_parameters(_stage_trial, raw=raw, overrides=overrides, sweep=name, parent=parent)
        scheduler = None
        if settings.scheduler == "asha":
            from ray.tune.schedulers import ASHAScheduler

            # A trial runs at least a quarter of its steps (and one logging window) before it can be stopped.
            grace = max(base.train.log_every_steps * settings.grace_period, base.train.max_steps // 4)
            # max_t past the last step: ASHA stops a trial that reaches max_t, which would cut off the end of a
            # finished run (its MLflow run and summary are completed after the last report).
            scheduler = ASHAScheduler(time_attr="step", max_t=base.train.max_steps + 1, grace_period=grace,
                                      reduction_factor=2)
        tuner = tune.Tuner(
            tune.with_resources(fn, {"CPU": 0.1}),  # the trial function only drives; its trainer asks for workers
            param_space=param_space(dims),
            tune_config=tune.TuneConfig(num_samples=settings.num_samples, max_concurrent_trials=concurrent,
                                        scheduler=scheduler, metric=metric, mode=mode),
            run_config=tune.RunConfig(name=name, storage_path=str(out / "tune"), verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
        results = tuner.fit()
        rows = sweep_rows(results, dims, None if pipeline else base.train.max_steps)
        close_stopped_runs(client, parent, {r["trial_id"] for r in rows if r["status"] == "STOPPED"})
        best = pick_best(rows, metric, mode)
        summary = {"name": name, "parent_run_id": parent, "tracking_uri": uri, "metric": metric, "mode": mode,
                   "trials": rows, "best": best, "wall_s": round(time.time() - started, 1),
                   "space": {d.key: {d.kind: list(d.values)} for d in dims}}
        write_sweep_outputs(summary, dims, out)
        for path in ("sweep.md", "sweep.json", "sweep.png"):
            if (out / path).exists():
                client.log_artifact(parent, str(out / path))
        if best:
            client.log_metric(parent, f"best_{metric}", float(best["metrics"][metric]))
            client.set_tag(parent, "best_checkpoint", str(best.get("checkpoint")))
        errored = [r for r in rows if r["status"] == "ERROR"]
        status = "FINISHED" if best else "FAILED"
        print(f"[sweep] done in {summary['wall_s']:.0f} s: {len(rows)} trial(s), {len(errored)} failed\n"
              f"{format_rows(rows, dims, metric)}", flush=True)
        if best:
            print(f"[sweep] best: {best['trial_id']} {metric}={best['metrics'][metric]:.4g} "
                  f"{best['params']} checkpoint {best.get('checkpoint')}", flush=True)
        print(f"[sweep] outputs in {out}; browse the runs: mlflow ui --backend-store-uri {uri}", flush=True)
        return summary
    finally:
        client.set_terminated(parent, status)


def sweep_rows(results, dims: list[Dimension], max_steps: Optional[int]) -> list[dict[str, Any]]:
    """One row per trial. DONE: the trial function finished and made its final report (it carries the run
    name); STOPPED: the scheduler stopped it after one of the training loop's reports, possibly the one at
    the last step (ASHA's top rung can fall on max_steps), before its stage could finish."""
    rows = []
    for result in results:
        cfg = result.config or {}
        metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))
                   and not isinstance(v, bool)}
        info = result.metrics or {}
        rows.append({"trial_id": info.get("trial_id") or Path(str(result.path)).name,
                     "params": {d.key: cfg.get(d.key) for d in dims},
                     "status": "ERROR" if result.error else (
                         "STOPPED" if max_steps and not info.get("run_name") else "DONE"),
                     "metrics": metrics, "checkpoint": info.get("checkpoint") or info.get("checkpoint_path"),
                     "mlflow_run_id": info.get("mlflow_run_id"), "run_name": info.get("run_name"),
                     "steps": info.get("step"),
                     "error": str(result.error).splitlines()[0][:300] if result.error else None})
    return sorted(rows, key=lambda r: r["trial_id"])


def close_stopped_runs(client, parent: str, stopped: set[str]) -> None:
    """A trial the scheduler stopped was cut off mid-run: its stage either never ended its MLflow run
    (RUNNING) or ended it as FAILED on the interruption. Mark those children KILLED (they keep the metrics
    logged until then); runs of trials that really failed stay FAILED."""
    experiment = client.get_run(parent).info.experiment_id
    settled = 0
    for _ in range(20):  # an interrupted trial may still be ending its run: repeat until two passes change nothing
        changed = False
        for run in client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'"):
            cut_off = run.data.tags.get("trial_id") in stopped and run.info.status not in ("FINISHED", "KILLED")
            if run.info.status == "RUNNING" or cut_off:
                client.set_terminated(run.info.run_id, "KILLED")
                changed = True
        settled = 0 if changed else settled + 1
        if settled >= 2:
            return
        time.sleep(1.0)


def pick_best(rows: list[dict], metric: str, mode: str) -> Optional[dict]:
    """The best trial among those that ran to the end: a trial ASHA stopped early reports an earlier
    step's metric (not comparable) and has no final checkpoint. Falls back to stopped trials only when
    none finished."""
    scored = [r for r in rows if r["status"] != "ERROR" and isinstance(r["metrics"].get(metric), (int, float))]
    finished = [r for r in scored if r["status"] == "DONE"]
    candidates = finished or scored
    if not candidates:
        return None
    return (min if mode == "min" else max)(candidates, key=lambda r: r["metrics"][metric])


def format_rows(rows: list[dict], dims: list[Dimension], metric: str) -> str:
    head = ["trial", *(d.key for d in dims), metric, "steps", "status"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for r in rows:
        value = r["metrics"].get(metric)
        cells = [r["trial_id"], *(f"{r['params'].get(d.key)}" for d in dims),
                 f"{value:.4g}" if isinstance(value, (int, float)) else "-", str(r.get("steps") or "-"), r["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_sweep_outputs(summary: dict, dims: list[Dimension], out: Path) -> None:
    """sweep.json (everything), sweep.md (the table) and sweep.png (metric against each numeric key)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "sweep.md").write_text(format_rows(summary["trials"], dims, summary["metric"]) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = summary["metric"]
    plotted = [d for d in dims if any(isinstance(r["params"].get(d.key), (int, float)) for r in summary["trials"])]
    panels = plotted or dims[:1]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, d in zip(axes[0], panels):
        points = [(r["params"].get(d.key), r["metrics"].get(metric)) for r in summary["trials"]
                  if isinstance(r["metrics"].get(metric), (int, float))]
        xs = [p[0] for p in points]
        numeric = all(isinstance(x, (int, float)) for x in xs)
        ax.scatter(xs if numeric else [str(x) for x in xs], [p[1] for p in points])
        if numeric and xs and min(xs) > 0 and (d.kind == "loguniform" or max(xs) / min(xs) >= 50):
            ax.set_xscale("log")
        elif numeric and xs and min(xs) == 0 and max(xs) >= 50:  # e.g. align weights 0, 10, 100
            ax.set_xscale("symlog", linthresh=1)
        ax.set_xlabel(d.key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{summary['name']}: {metric} per trial ({summary['mode']} is best)")
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=100)
    plt.close(fig)
