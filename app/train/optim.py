"""AdamW with decay on >=2-D weights only, and linear warmup followed by cosine decay.

Two schedules (train.lr_schedule): `cosine_per_step` decays every step from the end of the warmup to
max_steps; `cosine_per_epoch` is LAVIS's `linear_warmup_cosine_lr` (the reference's): a linear warmup
over the first warmup_steps steps of the first epoch (then lr for the rest of that epoch), and from
epoch e >= 1 on, lr = min_lr + (lr - min_lr) * (1 + cos(pi * e / epochs)) / 2, set once per epoch.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch


def build_optimizer(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float,
                    betas: tuple[float, float], fused: bool = False) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only (frozen modules get no optimiser state); fused=True: torch's
    fused kernel (one launch for all parameters; the same update up to float rounding)."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]  # biases, LayerNorm weights, temperature
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, fused=fused or None)


def lr_at(step: int, *, lr: float, min_lr: float, warmup_lr: float, warmup_steps: int, max_steps: int,
          schedule: str = "cosine_per_step", epoch: int = 0, epochs: int = 1) -> float:
    """Learning rate for the update that follows `step` completed updates (in `epoch`, for cosine_per_epoch)."""
    if schedule == "cosine_per_epoch":
        if epoch == 0:  # LAVIS's warmup_lr_schedule, then the initial lr until the epoch ends
            return min(lr, warmup_lr + (lr - warmup_lr) * step / max(warmup_steps, 1)) if warmup_steps else lr
        return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * epoch / epochs))
    if schedule != "cosine_per_step":
        raise ValueError(f"unknown learning-rate schedule {schedule!r}")
    if step < warmup_steps:
        return warmup_lr + (lr - warmup_lr) * step / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


class Schedule:
    """The LambdaLR factor of train.lr_schedule. A callable object, so LambdaLR's state_dict keeps its plain
    attributes (the epoch included) in the checkpoint."""

    def __init__(self, train_cfg):
        self.lr, self.min_lr, self.warmup_lr = train_cfg.lr, train_cfg.min_lr, train_cfg.warmup_lr
        self.warmup_steps, self.max_steps = train_cfg.warmup_steps, train_cfg.max_steps
        self.schedule, self.epochs = train_cfg.lr_schedule, train_cfg.epochs
        self.epoch = 0

    def __call__(self, step: int) -> float:
        return lr_at(step, lr=self.lr, min_lr=self.min_lr, warmup_lr=self.warmup_lr, warmup_steps=self.warmup_steps,
                     max_steps=self.max_steps, schedule=self.schedule, epoch=self.epoch, epochs=self.epochs) / self.lr


def build_scheduler(optimizer: torch.optim.Optimizer, train_cfg) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, Schedule(train_cfg))


def set_epoch(scheduler: torch.optim.lr_scheduler.LambdaLR, epoch: int) -> None:
    """Tell the schedule which epoch the next updates belong to, and set the optimiser's lr for it now
    (cosine_per_epoch changes at an epoch's start; cosine_per_step does not depend on the epoch)."""
    for fn in scheduler.lr_lambdas:
        fn.epoch = epoch
    for group, base, fn in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
