"""AdamW with decay on >=2-D weights only, and linear warmup followed by cosine decay."""

from __future__ import annotations

import math
from typing import Iterable

import torch


def build_optimizer(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float,
                    betas: tuple[float, float]) -> torch.optim.AdamW:
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]  # biases, LayerNorm weights, temperature
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas)


def lr_at(step: int, *, lr: float, min_lr: float, warmup_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Learning rate for the update that follows `step` completed updates."""
    if step < warmup_steps:
        return warmup_lr + (lr - warmup_lr) * step / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, train_cfg) -> torch.optim.lr_scheduler.LambdaLR:
    kwargs = dict(lr=train_cfg.lr, min_lr=train_cfg.min_lr, warmup_lr=train_cfg.warmup_lr,
                  warmup_steps=train_cfg.warmup_steps, max_steps=train_cfg.max_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, **kwargs) / train_cfg.lr)
