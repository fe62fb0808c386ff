"""One optimiser update from `train.grad_accum_steps` micro-batches (the training loop's step).

Each micro-batch's loss is divided by the number of micro-batches and back-propagated, so the update is
the mean of the micro-batches' gradients, as LAVIS's runner (`accum_grad_iters`) does. The DDP-wrapped
trainable modules skip their gradient all-reduce (`no_sync`) on every micro-batch but the last, whose
backward all-reduces the sum. A loss that is a mean over a batch with no coupling between samples (the
stage-2 LM loss on captions of equal length, the alignment MSE) gives the same update as one batch of
batch x accumulation; terms coupled across the batch (stage-0 contrastive, stage-1 ITC and ITM's hard
negatives) see one micro-batch at a time, and a token-mean LM loss weights each micro-batch's mean
equally whatever its token count (the reference's accumulation does the same).
"""

from __future__ import annotations

from contextlib import ExitStack, nullcontext
from typing import Callable, Optional

import torch
from torch.nn.parallel import DistributedDataParallel


def no_sync(modules: list[torch.nn.Module], skip: bool) -> ExitStack:
    """`no_sync()` of every DDP-wrapped module when `skip` (a micro-batch before the last); else nothing."""
    stack = ExitStack()
    if skip:
        for module in modules:
            if isinstance(module, DistributedDataParallel):
                stack.enter_context(module.no_sync())
    return stack


class Stepper:
    """Runs micro-batches and steps the optimiser after every `accum_steps` of them.

    `micro(batch)` returns the step's named losses (unscaled, for logging) and whether this micro-batch
    completed an update (then the optimiser, the scaler and the schedule have stepped)."""

    def __init__(self, model: torch.nn.Module, losses: Callable[[torch.nn.Module, dict], dict[str, torch.Tensor]],
                 optimizer: torch.optim.Optimizer, scheduler, *, accum_steps: int = 1,
                 grad_clip_norm: Optional[float] = None, scaler: Optional[torch.amp.GradScaler] = None,
                 autocast=None):
        if accum_steps < 1:
            raise ValueError(f"accum_steps must be at least 1, got {accum_steps}")
        self.model, self.losses, self.optimizer, self.scheduler = model, losses, optimizer, scheduler
        self.accum_steps, self.grad_clip_norm, self.scaler = accum_steps, grad_clip_norm, scaler
        self.autocast = autocast if autocast is not None else nullcontext()
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.wrapped = [getattr(model, name) for name in getattr(model, "trainable_names", ())]
        self.pending = 0  # micro-batches whose gradients wait for the update

    def micro(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
        last = self.pending + 1 == self.accum_steps
        with no_sync(self.wrapped, skip=not last):
            with self.autocast:
                losses = self.losses(self.model, batch)
            loss = losses["loss"] / self.accum_steps if self.accum_steps > 1 else losses["loss"]
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        self.pending += 1
        if not last:
            return losses, False
        self.update()
        return losses, True

    def update(self) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.pending = 0

    def discard(self) -> int:
        """Drop the gradients of an unfinished accumulation (the end of an epoch); returns how many
        micro-batches they came from."""
        dropped, self.pending = self.pending, 0
        if dropped:
            self.optimizer.zero_grad(set_to_none=True)
        return dropped
