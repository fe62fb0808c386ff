"""Collectives that degrade to no-ops in a single process."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


class _GatherLayer(torch.autograd.Function):
    """all_gather whose backward sums every worker's gradient for each part (LAVIS's `GatherLayer`). Used
    instead of `torch.distributed.nn.functional.all_gather`, whose gloo backward (all-to-all) returned
    wrong gradients here when one step gathers two tensors (ITC's image and text features)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor):
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack(grads).contiguous()
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        return stacked[dist.get_rank()]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every worker along dim 0; gradients flow back to each worker's part."""
    if not is_distributed():
        return tensor
    return torch.cat(_GatherLayer.apply(tensor), dim=0)


def gather_features(tensor: torch.Tensor, with_grad: bool = False) -> torch.Tensor:
    """The columns of a contrastive similarity matrix: `tensor` from every worker, concatenated along dim 0.

    with_grad=False is the reference's `concat_all_gather` (`torch.distributed.all_gather`): the gathered
    side carries no gradient, the local part included, so each term trains only through its local rows.
    It is detached in a single process too, so one worker trains as N workers do (the reference itself
    returns the tensor unchanged, with its gradient, on one GPU). with_grad=True: gradients flow back to
    every worker's features (`gather_with_grad`).
    """
    if with_grad:
        return gather_with_grad(tensor)
    return gather(tensor.detach())


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


@torch.no_grad()
def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every worker along dim 0, without gradients (frozen features, ids)."""
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def gather_padded(tensor: torch.Tensor, pad_value: int = 0) -> torch.Tensor:
    """`gather` for (B, L) tensors whose width L differs between workers (trimmed padding): right-pads
    every part to the widest one first."""
    if not is_distributed():
        return tensor
    width = torch.tensor([tensor.shape[1]], device=tensor.device)
    dist.all_reduce(width, op=dist.ReduceOp.MAX)
    pad = int(width) - tensor.shape[1]
    if pad:
        tensor = torch.nn.functional.pad(tensor, (0, pad), value=pad_value)
    return gather(tensor)
