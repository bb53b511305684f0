"""The paper's optimisation recipe in plain PyTorch: AdamW with a slower backbone, clipping, step decay.

Transformer and heads learn at 1e-4, the backbone at 1e-5, weight decay 1e-4,
gradients clipped to a global norm of 0.1, and the learning rate multiplied by
0.1 after `lr_drop_epoch` epochs (200 of 300 in the paper's long schedule).
Frozen parameters (the stem, stage 1, everything when the backbone is frozen)
are left out of the optimiser.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import RaydetrError


@dataclass(frozen=True)
class OptimizerConfig:
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    weight_decay: float = 1e-4
    clip_max_norm: float = 0.1
    """Global gradient-norm clip; 0 disables clipping."""
    lr_drop_epoch: int = 200
    lr_drop_factor: float = 0.1
    warmup_steps: int = 0
    """Optimiser steps over which every learning rate ramps linearly up from 1/warmup_steps of its
    value (0: none, the paper). Fast-convergence option, see `detr.recipes`."""
    ema_decay: float = 0.0
    """Decay of an exponential moving average of the weights (`detr.ema`; 0: none, the paper). With it,
    validation, checkpoints and the exported model use the average, while training goes on with the
    weights as trained."""

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.lr_backbone < 0 or self.weight_decay < 0 or self.clip_max_norm < 0:
            raise RaydetrError(f"invalid optimiser settings: {self}")
        if self.warmup_steps < 0:
            raise RaydetrError(f"warmup_steps must be >= 0: {self}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise RaydetrError(f"ema_decay must be in [0, 1) (0: no average): {self}")
        if self.lr_drop_epoch < 1 or not 0 < self.lr_drop_factor <= 1:
            raise RaydetrError(f"lr_drop_epoch must be >= 1 and lr_drop_factor in (0, 1]: {self}")


def parameter_groups(model: nn.Module, lr: float, lr_backbone: float) -> list[dict]:
    """Two AdamW groups: backbone parameters at `lr_backbone`, everything else at `lr`.

    With `lr_backbone == 0` the backbone is left out entirely (nothing to update).
    """
    backbone, rest = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (backbone if name.startswith("backbone.") or ".backbone." in name else rest).append(param)
    groups = [{"params": rest, "lr": lr, "name": "transformer"}]
    if backbone and lr_backbone > 0:
        groups.append({"params": backbone, "lr": lr_backbone, "name": "backbone"})
    return groups


def build_optimizer(model: nn.Module, config: OptimizerConfig) -> torch.optim.AdamW:
    groups = parameter_groups(model, config.lr, config.lr_backbone)
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, config: OptimizerConfig) -> torch.optim.lr_scheduler.StepLR:
    """Stepped once per epoch: multiplies every group's rate by `lr_drop_factor` at `lr_drop_epoch`."""
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_drop_epoch, gamma=config.lr_drop_factor)


def build_warmup_scheduler(
    optimizer: torch.optim.Optimizer, config: OptimizerConfig
) -> torch.optim.lr_scheduler.LinearLR | None:
    """Stepped once per optimiser step; None without warm-up. It scales the rates multiplicatively,
    so it composes with the per-epoch `build_lr_scheduler` on the same optimiser."""
    if config.warmup_steps == 0:
        return None
    return torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=1.0 / config.warmup_steps, end_factor=1.0, total_iters=config.warmup_steps
    )


def clip_gradients(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm (when max_norm > 0) and return the norm before clipping."""
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
