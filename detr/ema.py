"""An exponential moving average of a model's weights, for evaluation and export.

A briefly trained DETR at a constant learning rate is noisy from step to step:
its scores and PQ swing with the last few hundred batches. Averaging the weights
over recent steps (as YOLO and RT-DETR do) gives the model a run would have at a
slowly decaying rate, without changing how it trains. Built on torch's
`AveragedModel`; batch-norm statistics are averaged with the weights.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from .errors import RaydetrError


def ema_decay_at(decay: float, updates: int, warmup: float = 10.0) -> float:
    """The decay used for the `updates`-th average: `decay`, lowered early on as (1 + n) / (warmup + n)
    so the random initial weights are forgotten within the first few dozen steps."""
    return min(decay, (1.0 + updates) / (warmup + updates))


def ema_model(model: nn.Module, decay: float, warmup: float = 10.0) -> AveragedModel:
    """A copy of `model` whose weights and buffers follow its exponential moving average; call
    `update_parameters(model)` after each optimiser step and read the average from `.module`."""
    if not 0.0 < decay < 1.0:
        raise RaydetrError(f"EMA decay must be in (0, 1), got {decay}")

    def average(averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
        d = ema_decay_at(decay, int(num_averaged), warmup)
        if averaged and torch.is_floating_point(averaged[0]):
            torch._foreach_lerp_(averaged, current, 1.0 - d)
        else:  # integer buffers (batch norm's step counts) follow the model
            for a, c in zip(averaged, current):
                a.copy_(c)

    return AveragedModel(model, multi_avg_fn=average, use_buffers=True)
