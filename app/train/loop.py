"""The one training loop, run on every Ray Train worker for every stage (in Ray Train's local mode,
`scaling.num_workers=0`, in the launching process, which then stores the checkpoints itself).

Per step: `train.grad_accum_steps` micro-batches from the worker's dataset shard -> stage model returns named
losses -> backward (DDP all-reduce on the last micro-batch only) -> clip -> AdamW -> schedule
(`app.train.step`). Every `log_every_steps` the window means of each loss term (averaged over workers), lr,
samples/s and tokens/s go, on rank 0, to MLflow (and to Ray Train when a callback reads them: a sweep); every
`checkpoint_every_steps` (and at the end) rank 0 writes a checkpoint, reported to Ray Train with the metrics.
A restarted run (same name,
or after a worker failure) resumes from the latest checkpoint, mid-epoch included.
"""

from __future__ import annotations

import logging
import random
import resource
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional

import numpy as np
import ray.train
import ray.train.torch
import torch

from app import storage, tracking
from app.config import Config
from app.data.captions import trim_padding
from app.data.feature_cache import BF16_SUFFIX, decode_cached
from app.data.stats import DataError, read_counts, read_examples, skipped_problem
from app.stages import get_stage
from app.train import dist
from app.train.checkpoint import (IncompleteCheckpoint, TrainerState, checkpoint_folders, checkpoint_name,
                                  load_trainable, load_training_state, save_checkpoint, store_checkpoint,
                                  verify_checkpoint)
from app.train.epochs import begin_epoch, epoch_record
from app.train.levers import apply_levers
from app.train.optim import build_optimizer, build_scheduler, set_epoch
from app.train.step import Stepper

logger = logging.getLogger(__name__)


class Window:
    """Sums of each loss term, micro-batches, samples, tokens and optimiser steps since the last report (kept on
    device). Loss means are over micro-batches; steps/s counts optimiser updates."""

    def __init__(self, keys: list[str], device: torch.device):
        self.keys = keys
        self.device = device
        self.seen: set[str] = set()
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(len(self.keys) + 4, device=self.device, dtype=torch.float64)
        self.start = time.perf_counter()

    def add(self, losses: dict[str, torch.Tensor], samples: int, tokens: torch.Tensor, step: bool = True) -> None:
        """Accumulates on device: nothing here waits for the GPU. `step`: this micro-batch completed an update."""
        self.seen.update(k for k in self.keys if k in losses)
        zero = torch.zeros((), device=self.device, dtype=torch.float64)
        values = [losses[k].detach().double() if k in losses else zero for k in self.keys]
        values += [zero + 1.0, zero + samples, tokens.double(), zero + float(step)]
        self.sums += torch.stack(values)

    def reduce(self) -> dict[str, float] | None:
        """Global means of each term over the window and global throughput; None for an empty window.
        Every worker must call it (all-reduce)."""
        sums = dist.all_reduce_sum(self.sums.clone()).tolist()
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        batches, samples, tokens, steps = sums[-4:]
        if batches == 0:
            self.reset()
            return None
        workers = dist.world_size()
        out = {k: v / batches for k, v in zip(self.keys, sums) if k in self.seen}  # terms with weight 0 are absent
        out.update(samples_per_s=samples / elapsed, tokens_per_s=tokens / elapsed,
                   steps_per_s=steps / workers / elapsed)
        self.reset()
        return out


def _memory_metrics(device: torch.device) -> dict[str, float]:
    out = {"cpu_max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if device.type == "cuda":
        out["gpu_max_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def progress(line: str) -> None:
    """One line to the job's output (Ray forwards worker stdout to the driver and `ray job logs`)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Token ids and masks as int64; a feature cache's bfloat16 tensors back in bfloat16 (`decode_cached`)."""
    moved = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    cached = decode_cached({k: v for k, v in moved.items() if k.endswith(BF16_SUFFIX)})
    return {**{k: (v.long() if v.dtype in (torch.int8, torch.int16, torch.int32) else v)
               for k, v in moved.items() if not k.endswith(BF16_SUFFIX)}, **cached}


def _restore_complete(checkpoint: Optional[ray.train.Checkpoint], restore, cfg: Config, s3: storage.S3Options,
                      rank: int) -> tuple[Optional[TrainerState], set[str], bool, str]:
    """Restore the run folder's newest complete checkpoint: Ray Train's latest, or one written after it that
    a failure kept Ray from registering (fewer steps lost; with no registered checkpoint at all, a worker
    killed right after writing the run's first one), or, when the latest is incomplete or damaged, the
    newest complete one before it. Says which it passed over and why; returns the state (None: nothing to
    restore, start afresh), the names of those newer than the one restored (never written to again) and
    whether it is Ray Train's latest, and its name ("" when none)."""
    latest = Path(checkpoint.path).name if checkpoint is not None else ""
    run_uri = storage.join(cfg.run.storage_path, cfg.run.name)
    try:
        folders = checkpoint_folders(run_uri, s3)
    except OSError as err:
        logger.warning("cannot list %s (%s): resuming from Ray Train's latest checkpoint, %s", run_uri, err,
                       latest or "(none)")
        folders = []
    if checkpoint is not None and latest not in {name for name, _ in folders}:
        folders.append((latest, None))
    passed_over: dict[str, str] = {}
    for name, problem in folders:
        if problem is None:
            fs, path = storage.resolve(storage.join(run_uri, name), s3)
            candidate = checkpoint if name == latest else ray.train.Checkpoint(path=path, filesystem=fs)
            try:
                state = restore(candidate)
            except IncompleteCheckpoint as err:  # the sizes matched, a digest did not
                problem = str(err)
        if problem is not None:
            passed_over[name] = problem
            continue
        if rank == 0:
            for bad, why in passed_over.items():
                progress(f"[{cfg.stage}] not resuming from {bad}: {why}")
            if name > latest and not cfg.scaling.local_mode:  # (local mode registers none)
                progress(f"[{cfg.stage}] resuming from {name}, written after Ray Train's last registered checkpoint "
                         f"({latest or 'none'})")
        return state, set(passed_over), name == latest, name
    if checkpoint is None:  # only incomplete ones (or none): a fresh start that leaves their names alone
        if rank == 0:
            for bad, why in passed_over.items():
                progress(f"[{cfg.stage}] not resuming from {bad}: {why}")
        return None, set(passed_over), False, ""
    raise IncompleteCheckpoint(f"{run_uri} holds no complete checkpoint to resume from ({latest}: "
                               f"{passed_over.get(latest)}); start the run afresh under another run.name, or "
                               f"remove {run_uri}")


def _logged_through(cfg: Config, run_id: str) -> int:
    """The last step the run's MLflow history holds (-1 when none, or when MLflow cannot say): a restart after
    the step-0 validation reached MLflow does not log it again."""
    try:
        return tracking.last_logged_step(cfg.mlflow.tracking_uri, run_id)
    except Exception as err:  # tracking trouble must not stop a resume
        logger.warning("could not read the MLflow history of run %s: %s", run_id, err)
        return -1


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    cfg = Config.model_validate(loop_config["config"])
    run_id: str = loop_config["mlflow_run_id"]
    counter = loop_config.get("counter")
    # Metrics reach Ray Train with each checkpoint, and at every logging window only for a callback that reads them
    # (a sweep's Tune report): Ray Train takes one report per controller poll (2 s), so a report sooner than that
    # blocks the step (9% of a tiny stage-0 run's time); MLflow gets every window from rank 0 either way.
    report_windows = loop_config.get("report_windows", True)
    s3 = storage.S3Options.from_config(cfg)
    stage = get_stage(cfg.stage)
    rank = ray.train.get_context().get_world_rank()
    _seed_everything(cfg.run.seed + rank)
    device = ray.train.torch.get_device()
    use_cuda = device.type == "cuda"

    # 1. Model, optimiser, schedule; weights and state of the latest checkpoint when resuming.
    model = stage.build_model(cfg, s3).to(device)
    levers = apply_levers(model, cfg, device)
    optimizer = build_optimizer(model.trainable_parameters(), cfg.train.lr, cfg.train.weight_decay, cfg.train.betas,
                                fused=cfg.train.fused_adamw and use_cuda)
    scheduler = build_scheduler(optimizer, cfg.train)
    scaler = torch.amp.GradScaler("cuda") if use_cuda and cfg.train.precision == "fp16" else None
    def restore(candidate: ray.train.Checkpoint) -> TrainerState:
        with candidate.as_directory() as directory:
            verify_checkpoint(directory)  # before anything is loaded from it
            load_trainable(model, directory)
            return load_training_state(directory, optimizer, scheduler, scaler)

    checkpoint = ray.train.get_checkpoint()
    # skipped: incomplete checkpoints newer than the one restored, never written to again; registered: the
    # restored checkpoint is one Ray Train knows.
    restored, skipped, registered, restored_name = _restore_complete(checkpoint, restore, cfg, s3, rank)
    local_mode = cfg.scaling.local_mode  # this process trains; checkpoints are stored here, not by Ray Train
    run_uri = storage.join(cfg.run.storage_path, cfg.run.name)
    registered = registered or (local_mode and restored is not None)
    state = restored or TrainerState()
    accum = cfg.train.grad_accum_steps
    global_batch = cfg.scaling.world_size * cfg.train.batch_size_per_worker * accum
    if rank == 0:
        trainable = sum(p.numel() for p in model.trainable_parameters())
        progress(f"[{cfg.stage}] {trainable:,} trainable parameters; global batch {cfg.scaling.world_size} worker(s) x "
                 f"{cfg.train.batch_size_per_worker} x {accum} accumulated = {global_batch}; "
                 f"{', '.join(levers) or 'no levers'}" + (", fused AdamW" if optimizer.defaults.get("fused") else ""))
    if restored is not None and rank == 0:
        progress(f"[{cfg.stage}] resuming from step {state.step} (epoch {state.epoch}, "
                 f"batch {state.batches_in_epoch})")
    resumed_from = state.step
    # Steps after the checkpoint that a failed attempt had already logged are trained again; MLflow keeps the
    # first values, so the run's history has each step once. (A fresh attempt may follow one that logged.)
    logged_through = _logged_through(cfg, run_id) if rank == 0 else -1
    if logged_through > resumed_from:
        progress(f"[{cfg.stage}] MLflow holds steps through {logged_through}: steps {resumed_from + 1}-"
                 f"{logged_through} are trained again and not logged twice")
    for name in model.trainable_names:
        setattr(model, name, ray.train.torch.prepare_model(getattr(model, name), move_to_device=False))
    model.train()

    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
    autocast = (torch.autocast("cuda", dtype=autocast_dtype) if use_cuda and autocast_dtype else nullcontext())
    stepper = Stepper(model, stage.losses, optimizer, scheduler, accum_steps=accum,
                      grad_clip_norm=cfg.train.grad_clip_norm, scaler=scaler, autocast=autocast)
    window = Window(list(stage.loss_keys) + ["loss"], device)
    shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if loop_config.get("has_val") else None
    last_metrics: dict[str, float] = {}
    epoch_seen = None  # the samples of this epoch trained on, when the data numbers them (app.data.progress)
    last_saved = state.step if registered else -1  # a restored checkpoint Ray Train knows is not saved again
    reported = False
    config_yaml = cfg.to_yaml()
    held = tracking.HeldMetrics(cfg.mlflow.tracking_uri, run_id, say=lambda line: progress(f"[{cfg.stage}] {line}"))

    def validate() -> dict[str, float]:
        """Mean of each loss term over the validation shard (capped by the driver at data.val_max_batches)."""
        val_window = Window(list(stage.loss_keys) + ["loss"], device)
        model.eval()
        with torch.no_grad():
            for batch in val_shard.iter_torch_batches(batch_size=cfg.train.batch_size_per_worker, drop_last=True,
                                                      prefetch_batches=cfg.data.prefetch_batches):
                batch = trim_padding(_to_device(batch, device))
                with autocast:
                    losses = stage.losses(model, batch)
                val_window.add(losses, samples=cfg.train.batch_size_per_worker, tokens=stage.count_tokens(batch))
        model.train()
        means = val_window.reduce() or {}
        return {f"val_{k}": v for k, v in means.items() if k in val_window.keys}

    def check_data() -> None:
        """Stop the run when more samples were unusable than data.max_skipped_fraction allows."""
        problem = skipped_problem(read_counts(counter), cfg.data.max_skipped_fraction, read_examples(counter))
        if problem:
            raise DataError(problem)

    def report(save: bool) -> None:
        nonlocal last_metrics, last_saved, reported
        reported = True
        metrics = window.reduce() or last_metrics  # an empty window (data ran out) repeats the last numbers
        metrics.update(step=state.step, epoch=state.epoch, lr=scheduler.get_last_lr()[0],
                       global_batch_size=global_batch, **_memory_metrics(device))
        if save and val_shard is not None:
            metrics.update(validate())
        if rank == 0 and counter is not None and stage.limit_skipped:
            check_data()
        last_metrics = dict(metrics)
        dir_name = checkpoint_name(state.step, skipped)
        if rank == 0:
            # Logged before the checkpoint is written: a worker killed in between resumes from the checkpoint
            # before it and trains this step again (not logged twice), where logging after the write would let a
            # kill in between resume past a step MLflow never got.
            log_step(metrics)
        if save and epoch_seen is not None:  # on every rank: the record gathers what each worker trained on
            state.consumed = epoch_record(epoch_seen, counter)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if save and rank == 0:
                save_checkpoint(tmp, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                                state=state, config_yaml=config_yaml, manifest=stage.manifest(cfg),
                                extras=lambda directory: stage.save_extras(model, directory, cfg, s3))
                ckpt = ray.train.Checkpoint.from_directory(tmp)
                if local_mode:
                    fs, path = store_checkpoint(tmp, run_uri, dir_name, s3, keep=cfg.train.num_checkpoints_to_keep,
                                                leave=skipped)
                    ckpt = ray.train.Checkpoint(path=path, filesystem=fs)
            if save or report_windows:
                ray.train.report({**metrics, "resumed_from_step": resumed_from}, checkpoint=ckpt,
                                 checkpoint_dir_name=dir_name if save else None)
        if save:
            last_saved = state.step
            if rank == 0:
                held.log(state.step, {}, tags={"checkpoint_uri": storage.join(run_uri, dir_name)})

    def log_step(metrics: dict[str, float]) -> None:
        losses = " ".join(f"{k}={metrics[k]:.4f}" for k in stage.loss_keys if k in metrics)
        losses += "".join(f" val_{k}={metrics[f'val_{k}']:.4f}" for k in stage.loss_keys if f"val_{k}" in metrics)
        replayed = state.step <= logged_through
        progress(f"[{cfg.stage}] step {state.step}/{cfg.train.max_steps} {losses} lr={metrics['lr']:.2e} "
                 f"samples/s={metrics.get('samples_per_s', 0.0):.1f} "
                 f"tokens/s={metrics.get('tokens_per_s', 0.0):.0f}{' (trained again)' if replayed else ''}")
        if replayed:
            return
        try:
            counts = {f"data_{k}": v for k, v in read_counts(counter).items()}
        except Exception as err:  # counting trouble must not kill a long run
            logger.warning("could not read the data counts at step %d: %s", state.step, err)
            counts = {}
        held.log(state.step, {**metrics, **counts})

    # 2. Validation losses before any training, so every run's curve starts from its initial model.
    if val_shard is not None and restored is None:  # on every rank: the validation split is consumed by all
        initial = validate()
        if rank == 0 and initial and logged_through < 0:
            progress(f"[{cfg.stage}] step 0 " + " ".join(f"{k}={v:.4f}" for k, v in initial.items()))
            held.log(0, initial)

    # 3. Epochs over the streamed shard until max_steps.
    while state.epoch < cfg.train.epochs and state.step < cfg.train.max_steps:
        set_epoch(scheduler, state.epoch)
        epoch_seen, skip = begin_epoch(cfg.stage, state, counter, rank, progress)
        batches = shard.iter_torch_batches(
            batch_size=cfg.train.batch_size_per_worker, drop_last=True,
            local_shuffle_buffer_size=cfg.data.shuffle_buffer_rows or None,
            local_shuffle_seed=cfg.run.seed + rank + 1000 * state.epoch if cfg.data.shuffle_buffer_rows else None,
            prefetch_batches=cfg.data.prefetch_batches)
        finished_epoch = True
        for index, batch in enumerate(batches):
            if index < skip:  # mid-epoch resume of unnumbered data: these batches were trained on before
                continue
            ids = batch.pop("sample_id", None)
            if ids is not None and epoch_seen is not None:
                epoch_seen.add(ids.numpy())
            batch = trim_padding(_to_device(batch, device))
            losses, stepped = stepper.micro(batch)
            state.batches_in_epoch += 1  # micro-batches: a resume skips as many (a multiple of grad_accum_steps)
            window.add(losses, samples=cfg.train.batch_size_per_worker, tokens=stage.count_tokens(batch), step=stepped)
            if not stepped:
                continue
            state.step += 1
            if state.step >= cfg.train.max_steps:
                finished_epoch = False
                break
            save = state.step % cfg.train.checkpoint_every_steps == 0
            if save or state.step % cfg.train.log_every_steps == 0:
                report(save)
        dropped = stepper.discard() if finished_epoch else 0
        if dropped and rank == 0:
            progress(f"[{cfg.stage}] epoch {state.epoch} ended {dropped} micro-batch(es) into an update of "
                     f"train.grad_accum_steps={accum}: their gradients are dropped")
        if finished_epoch:
            state.epoch += 1
            state.batches_in_epoch = 0
            state.consumed, epoch_seen = None, None

    if rank == 0 and state.step < cfg.train.max_steps and state.epoch >= cfg.train.epochs:
        progress(f"[{cfg.stage}] train.epochs={cfg.train.epochs} passes over the data ended the run at step "
                 f"{state.step}, before train.max_steps={cfg.train.max_steps} (the learning-rate schedule assumed "
                 f"max_steps): raise train.epochs to train longer on small data")

    # 4. Final report and checkpoint (also when the data ran out before max_steps).
    if state.step > 0 and last_saved != state.step:
        report(save=True)
    elif not reported:  # nothing to train (no data, or a resumed run that had already finished)
        if rank == 0 and state.step >= cfg.train.max_steps:
            progress(f"[{cfg.stage}] already at step {state.step} of {cfg.train.max_steps}: nothing to do")
        final = None  # Ray Train hands back its latest checkpoint; in local mode, the one restored is it
        if local_mode and restored_name:
            fs, path = storage.resolve(storage.join(run_uri, restored_name), s3)
            final = ray.train.Checkpoint(path=path, filesystem=fs)
        ray.train.report({"step": state.step, "resumed_from_step": resumed_from}, checkpoint=final)
    if rank == 0:
        held.close(cfg.mlflow.outage_wait_s)
