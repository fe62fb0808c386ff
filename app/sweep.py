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
from app.stages import get_stage
from app.sweep_report import format_rows, pick_best, sweep_rows, write_sweep_outputs

KINDS = ("grid", "choice", "uniform", "loguniform", "randint")

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
    stage = get_stage(base.stage)
    if base.scaling.local_mode:
        raise ConfigError("scaling.num_workers=0: a stage sweep's trials report through Ray Train callbacks, which "
                          "Ray Train's local mode does not run; sweep with 1 or more workers")
    for d in dims:
        if d.key in ("stage", "run.name") or d.key.startswith("mlflow."):
            raise ConfigError(f"search space: '{d.key}' cannot be swept (each trial sets its own run name and "
                              "logs to the sweep's MLflow experiment)")
        for value in d.candidates():  # unknown keys and bad values first, named by the config's own checks
            try:
                build_config(copy.deepcopy(raw), [*overrides, f"{d.key}={_override(value)}"])
            except ConfigError as err:
                raise ConfigError(f"search space: '{d.key}' = {value!r}: {err}") from None
        if not stage.reads_key(d.key):
            raise ConfigError(f"search space: stage '{base.stage}' does not use '{d.key}'; sweeping it would "
                              "train identical trials")
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
        for value in d.candidates():
            try:
                load_pipeline_config(config_path, [*overrides, f"{d.key}={_override(value)}"])
            except ConfigError as err:
                raise ConfigError(f"search space: '{d.key}' = {value!r}: {err}") from None
        if stage and not get_stage(stage).reads_key(rest):
            raise ConfigError(f"search space: stage '{stage}' ({head}) does not use '{rest}'")
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


def stopped_trial_settler(tracking_uri: str, parent: str):
    """A Tune callback that marks the MLflow runs of a trial the scheduler stopped (cut off mid-run: its
    stage never ended its run, or ended it as FAILED on the interruption) KILLED as the trial ends; they
    keep the metrics logged until then. Runs of finished trials are FINISHED already; those of trials that
    really failed stay FAILED (`on_trial_error` is not this). A trial that ends its run after this ran
    finds it KILLED and leaves it so (`app.tracking.end_run`)."""
    from ray import tune

    class SettleStoppedTrials(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            client = tracking.client(tracking_uri)
            experiment = client.get_run(parent).info.experiment_id
            runs = client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent}' and "
                                                                  f"tags.trial_id = '{trial.trial_id}'")
            for run in runs:
                if run.info.status in ("RUNNING", "FAILED"):
                    client.set_terminated(run.info.run_id, "KILLED")

    return SettleStoppedTrials()


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

    from app.train.launcher import init_ray, resolve_paths, single_host

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
    parent = tracking.create_run(uri, experiment, name, {"stage": "sweep", "sweep_of": stage_label, "metric": metric,
                                                         "mode": mode})
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
        per_cpus = base.scaling.world_size * base.scaling.cpus_per_worker  # (local mode: the trial's own process)
        per_gpus = base.scaling.world_size if base.scaling.use_gpu else 0
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
                                      failure_config=tune.FailureConfig(max_failures=0),
                                      callbacks=[stopped_trial_settler(uri, parent)]),
        )
        results = tuner.fit()
        rows = sweep_rows(results, dims, None if pipeline else base.train.max_steps)
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
        print(f"[sweep] outputs in {out}; browse the runs: {tracking.ui_command(uri, experiment)}", flush=True)
        return summary
    finally:
        client.set_terminated(parent, status)


