"""The little of `torch.distributed` the losses need, safe to call without a process group.

Loss normalisers (the number of target boxes, the classification weight) are
averaged over all workers so that each worker's loss, averaged by DDP, equals the
loss one worker would compute on the whole global batch.
"""
from __future__ import annotations

import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_reduce_mean(values: Tensor) -> Tensor:
    """Mean of a tensor over all workers (identity in a single process). Not differentiable."""
    if not is_distributed():
        return values
    values = values.detach().clone()
    dist.all_reduce(values)
    return values / world_size()


__all__ = ["is_distributed", "world_size", "rank", "all_reduce_mean"]
