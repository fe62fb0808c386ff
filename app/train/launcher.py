"""Driver side of a stage: validate, open the MLflow run, start or join Ray, fit a TorchTrainer.

All input checks run before any Ray resource is used. A launch whose `run.name` already has
checkpoints under `run.storage_path` resumes (Ray Train restores its latest checkpoint) and keeps
logging to the same MLflow run.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager, nullcontext
from typing import Any, Optional

import pyarrow.fs as pafs
import ray
import ray.data

from app import storage, tracking
from app.config import Config, ConfigError
from app.data.stats import DataError, create_counter, read_counts, read_examples, skipped_problem
from app.errors import UserError
from app.stages import get_stage

logger = logging.getLogger(__name__)


class StorageOutage(UserError, RuntimeError):
    """Object storage stopped answering for longer than the retries wait; the message says how to resume."""


# A local instance is one machine that nobody drains: Ray Train's preemption watcher (one more actor process
# per run, polling for node drains on clusters) has nothing to watch there, and costs each run about 2 s of
# start-up on a small machine. Clusters keep it.
LOCAL_ENV_VARS = {"TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
# Without the dashboard, Ray Train's placement-group cleaner (a safety net for a controller that dies abruptly;
# a run that ends removes its own group) cannot reach the state API and says so every second.
CLEANER_WARNING = r"Failed to query Ray Train Controller actor state"


def init_ray(cfg: Config) -> bool:
    """Join the cluster named by RAY_ADDRESS (set inside `ray job submit`), or start a local instance
    with more logical CPUs than cores so Ray Data is never starved by the trainer. True when local."""
    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return False
    start_local_ray(num_cpus=cfg.scaling.local_num_cpus)
    return True


def start_local_ray(num_cpus: int) -> None:
    """A local instance whose processes inherit LOCAL_ENV_VARS from this one. Not through a runtime_env: a
    job with one starts every worker process through Ray's environment set-up (a second interpreter), ~0.4 s
    of CPU more per process, and a run starts about ten (`python bench/ray_workers.py`)."""
    for key, value in LOCAL_ENV_VARS.items():
        os.environ.setdefault(key, value)
    skip_driver_lines(CLEANER_WARNING)
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)


def skip_driver_lines(pattern: str) -> None:
    """Drop worker log lines matching `pattern` from this driver's output: what Ray's documented
    RAY_DEDUP_LOGS_SKIP_REGEX does, which Ray reads once, when it is first imported."""
    import re

    from ray._private import ray_logging

    for dedup in (ray_logging.stdout_deduplicator, ray_logging.stderr_deduplicator):
        if dedup.skip_re is None:
            dedup.skip_re = re.compile(pattern)
        elif pattern not in dedup.skip_re.pattern.split("|"):
            dedup.skip_re = re.compile(f"{dedup.skip_re.pattern}|{pattern}")


def single_host() -> bool:
    """Every alive Ray node runs on this machine (a local instance, or a test cluster of several nodes)."""
    here = ray.util.get_node_ip_address()
    return all(node["NodeManagerAddress"] == here for node in ray.nodes() if node.get("Alive"))


def oversubscribed_host() -> bool:
    """Every alive Ray node runs on this machine, and together they advertise more logical CPUs than it has
    cores (a local instance started with `scaling.local_num_cpus`, a test cluster). Not a cluster's head
    alone before its workers join: Ray counts a head's real cores."""
    return single_host() and ray.cluster_resources().get("CPU", 0) > (os.cpu_count() or 1)


def ingest_options(cfg: Config, local: bool):
    """Ray Train's ingest options, with Ray Data's CPU budget (see `scaling.data_cpus`). When the job
    started the instance (`local`) or the instance oversubscribes this machine, the budget is the cores the
    trainer leaves: without it Ray Data starts a task process per spare logical CPU, each importing torch
    and transformers to tokenise a block the trainer may never reach (measured on 2 cores: a 2-step stage-0
    run took 95 s with 7 data CPUs, 60 s with 1)."""
    from ray.data import ExecutionResources
    from ray.train import DataConfig

    limit = cfg.scaling.data_cpus
    if limit is None and (local or oversubscribed_host()):
        limit = max(1.0, (os.cpu_count() or 1) - cfg.scaling.world_size * cfg.scaling.cpus_per_worker)
    options = DataConfig.default_ingest_options()
    # With several workers streaming_split hands blocks to whichever worker asks first: the order cannot repeat,
    # so no worker waits for a block in order.
    options.preserve_order = cfg.data.preserve_order and cfg.scaling.world_size <= 1
    if limit is not None:
        options.resource_limits = ExecutionResources.for_limits(cpu=limit)
    return options


def data_config(cfg: Config, local: bool):
    from ray.train import DataConfig

    return DataConfig(execution_options=ingest_options(cfg, local))


def local_mode_datasets(datasets: dict, cfg: Config, local: bool) -> dict:
    """Ray Train's local mode hands the training function the datasets as they are (no DataConfig): each
    gets the ingest options a worker's shard would have."""
    for ds in datasets.values():
        ds.context.execution_options = ingest_options(cfg, local)
    return datasets


@contextmanager
def torch_threads(count: int):
    """Local mode trains in this process: as many torch threads as a worker's CPUs (Ray gives a worker
    process OMP_NUM_THREADS from its CPUs), so the trainer leaves Ray Data the cores a worker would."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, count))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_paths(cfg: Config) -> Config:
    """Absolute local paths, so Ray workers in other directories see the same files."""
    cfg = cfg.model_copy(deep=True)
    if not storage.is_s3(cfg.run.storage_path):
        cfg.run.storage_path = storage.resolve(cfg.run.storage_path)[1]
    cfg.mlflow.tracking_uri = tracking.resolve_tracking_uri(cfg.mlflow.tracking_uri)
    for section, keys in ((cfg.data, ("text", "train", "val", "train_features")), (cfg.init_from, ("pformer", "qformer"))):
        for key in keys:
            value = getattr(section, key)
            if value and not storage.is_s3(value):
                setattr(section, key, storage.resolve(value)[1])
    for key in ("pformer", "llm", "vision", "qformer"):
        value = getattr(cfg.model, key)
        if storage.looks_local(value):
            setattr(cfg.model, key, storage.resolve(value)[1])
    return cfg


def existing_checkpoints(cfg: Config, s3: storage.S3Options) -> list[str]:
    fs, root = storage.resolve(storage.join(cfg.run.storage_path, cfg.run.name), s3)
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    return sorted(i.base_name for i in infos
                  if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_"))


def run_stage(cfg: Config, parent_run_id: Optional[str] = None, callbacks: Optional[list] = None,
              tags: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """Train one stage to `train.max_steps`; returns the summary (MLflow run, checkpoint, final losses).
    `callbacks`: extra Ray Train callbacks (a sweep trial passes Tune's report callback); `tags`: extra
    MLflow tags of the run."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from app.train.loop import train_loop_per_worker

    stage = get_stage(cfg.stage)
    if cfg.scaling.local_mode and callbacks:
        raise ConfigError("scaling.num_workers=0: Ray Train's local mode runs no Ray Train callbacks "
                          f"({', '.join(type(c).__name__ for c in callbacks)}); train with 1 or more workers")
    cfg = resolve_paths(cfg)
    s3 = storage.S3Options.from_config(cfg)
    cfg = stage.validate(cfg, s3)
    storage_fs, storage_path = storage.resolve(cfg.run.storage_path, s3)
    try:
        previous = existing_checkpoints(cfg, s3)
    except OSError as err:
        raise ConfigError(f"run.storage_path: cannot list {cfg.run.storage_path}: {err}") from None
    resuming = bool(previous)

    resume_run_id = (tracking.find_run(cfg.mlflow.tracking_uri, cfg.mlflow.experiment, cfg.run.name,
                                       cfg.run.storage_path) if resuming else None)
    data_tags = {f"data.{k}": v for k, v in cfg.data.model_dump().items()
                 if k in ("text", "train", "val") and v}
    run_id = tracking.start_run(cfg, tags={**data_tags, **(tags or {})}, parent_run_id=parent_run_id,
                                resume_run_id=resume_run_id)
    print(f"[{cfg.stage}] run '{cfg.run.name}': MLflow run {run_id} at {cfg.mlflow.tracking_uri}"
          f"{' (resuming)' if resuming else ''}", flush=True)

    status = "FAILED"
    try:
        local = init_ray(cfg)
        # One progress line per report comes from the trainer; per-operator bars would drown it.
        ray.data.DataContext.get_current().enable_operator_progress_bars = False
        counter = create_counter()
        datasets = stage.datasets(cfg, counter, s3)
        if cfg.scaling.local_mode:  # the training function runs here, in this process
            datasets = local_mode_datasets(datasets, cfg, local)
            # Local mode logs every report's metrics dict; the loop's own progress line says the same.
            logging.getLogger("ray.train.v2._internal.execution.train_fn_utils").setLevel(logging.WARNING)
            scaling = ScalingConfig(num_workers=0, use_gpu=cfg.scaling.use_gpu)
        else:
            scaling = ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                    resources_per_worker={"CPU": cfg.scaling.cpus_per_worker,
                                                          **cfg.scaling.worker_resources},
                                    placement_strategy=cfg.scaling.placement_strategy)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"config": cfg.model_dump(mode="json"), "mlflow_run_id": run_id, "counter": counter,
                               "has_val": "val" in datasets, "report_windows": bool(callbacks)},
            scaling_config=scaling,
            run_config=RunConfig(
                name=cfg.run.name, storage_path=storage_path,
                storage_filesystem=storage_fs if storage.is_s3(cfg.run.storage_path) else None,
                failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.num_checkpoints_to_keep),
                callbacks=list(callbacks or [])),
            datasets=datasets,
            dataset_config=data_config(cfg, local),
        )
        try:
            with torch_threads(int(cfg.scaling.cpus_per_worker)) if cfg.scaling.local_mode else nullcontext():
                result = trainer.fit()
        except Exception as err:
            # A worker stops the run when too many samples are unusable; say so plainly, naming examples.
            problem = stage.limit_skipped and skipped_problem(
                read_counts(counter), cfg.data.max_skipped_fraction, read_examples(counter), final=True)
            if problem:
                raise DataError(problem) from None
            outage = storage.s3_unavailable(err)
            if outage:
                raise StorageOutage(
                    f"S3 at {s3.resolved_endpoint() or 'AWS'} did not answer through every retry "
                    f"(storage.s3_max_attempts={cfg.storage.s3_max_attempts}): {outage}. Checkpoints cut short are "
                    f"never resumed from: once S3 answers, relaunch with run.name={cfg.run.name} to resume from the "
                    "newest complete one") from None
            raise
        counts = read_counts(counter)
        metrics = dict(result.metrics or {})
        data_uri = cfg.data.text or cfg.data.train or "the data"
        problem = stage.limit_skipped and skipped_problem(counts, cfg.data.max_skipped_fraction,
                                                          read_examples(counter), final=True)
        if result.checkpoint is None or not metrics.get("step"):
            raise DataError(f"no training step ran: {data_uri} yielded no full batch of "
                            f"{cfg.train.batch_size_per_worker} per worker; data counts: {counts or 'none'}"
                            + (f"; {problem}" if problem else ""))
        if problem:
            raise DataError(f"{problem} (checkpoint kept: {result.checkpoint.path})")
        checkpoint_uri = storage.to_uri(result.checkpoint.filesystem, result.checkpoint.path) \
            if storage.is_s3(cfg.run.storage_path) else result.checkpoint.path
        tracking.log_metrics(cfg.mlflow.tracking_uri, run_id, {f"data_{k}": v for k, v in counts.items()},
                             step=int(metrics["step"]))
        tracking.set_tags(cfg.mlflow.tracking_uri, run_id, {"checkpoint_uri": checkpoint_uri})
        status = "FINISHED"
    finally:
        tracking.end_run(cfg.mlflow.tracking_uri, run_id, status)

    summary = {
        "stage": cfg.stage,
        "run_name": cfg.run.name,
        "mlflow_run_id": run_id,
        "tracking_uri": cfg.mlflow.tracking_uri,
        "checkpoint": checkpoint_uri,
        "step": int(metrics["step"]),
        # A launch with nothing left to train writes no checkpoint, and Ray hands back the metrics stored
        # with the latest one (from an earlier launch): it resumed from, and stopped at, that step.
        "resumed_from_step": (int(metrics["step"]) if resuming and checkpoint_uri.rstrip("/").endswith(previous[-1])
                              else int(metrics.get("resumed_from_step", 0))),
        "metrics": {k: metrics[k] for k in (*stage.loss_keys, "loss", *(f"val_{k}" for k in (*stage.loss_keys, "loss")))
                    if k in metrics},
        "throughput": {k: metrics[k] for k in ("samples_per_s", "tokens_per_s") if k in metrics},
        "data": counts,
    }
    tracking.log_json_artifact(cfg.mlflow.tracking_uri, run_id, "summary.json", summary)
    print(f"[{cfg.stage}] done at step {summary['step']}: {summary['metrics']}; checkpoint {checkpoint_uri}", flush=True)
    print(f"[{cfg.stage}] browse runs: {tracking.ui_command(cfg.mlflow.tracking_uri, cfg.mlflow.experiment)}", flush=True)
    return summary
