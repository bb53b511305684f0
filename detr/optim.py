"""The paper's optimisation recipe in plain PyTorch: AdamW with a slower backbone, clipping, step decay.

Transformer and heads learn at 1e-4, the backbone at 1e-5, weight decay 1e-4,
gradients clipped to a global norm of 0.1, and the learning rate multiplied by
0.1 after `lr_drop_epoch` epochs (200 of 300 in the paper's long schedule).
Frozen parameters (the stem, stage 1, everything when the backbone is frozen)
are left out of the optimiser.

A run with a deadline (a time budget, as the fast recipe's users set) is better served by
`lr_schedule: cosine`: the rate stays flat for a share of the run, then falls along a half cosine fitted
to the run's end, whichever of its time budget and its last epoch comes first (`DeadlineCosine`), as
D-FINE's and DEIM's flat-cosine schedules are fitted to their epochs.
"""
from __future__ import annotations

import math
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
    lr_schedule: str = "step"
    """How the rates fall: "step" (the paper: times `lr_drop_factor` after `lr_drop_epoch` epochs) or
    "cosine" (flat for `flat_fraction` of the run, then a half cosine down to `final_lr_factor` of the
    full rates at the run's end)."""
    final_lr_factor: float = 0.05
    """With `lr_schedule: cosine`, the share of every rate left at the end of the run."""
    flat_fraction: float = 0.0
    """With `lr_schedule: cosine`, the share of the run at the full rates before the cosine starts."""

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.lr_backbone < 0 or self.weight_decay < 0 or self.clip_max_norm < 0:
            raise RaydetrError(f"invalid optimiser settings: {self}")
        if self.warmup_steps < 0:
            raise RaydetrError(f"warmup_steps must be >= 0: {self}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise RaydetrError(f"ema_decay must be in [0, 1) (0: no average): {self}")
        if self.lr_drop_epoch < 1 or not 0 < self.lr_drop_factor <= 1:
            raise RaydetrError(f"lr_drop_epoch must be >= 1 and lr_drop_factor in (0, 1]: {self}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise RaydetrError(f"lr_schedule {self.lr_schedule!r} is not one of {list(LR_SCHEDULES)}")
        if not 0 <= self.final_lr_factor <= 1 or not 0 <= self.flat_fraction < 1:
            raise RaydetrError(f"final_lr_factor must be in [0, 1] and flat_fraction in [0, 1): {self}")


LR_SCHEDULES = ("step", "cosine")


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
    """Stepped once per epoch: multiplies every group's rate by `lr_drop_factor` at `lr_drop_epoch` (with the
    cosine schedule it never drops: the cosine is the decay)."""
    gamma = config.lr_drop_factor if config.lr_schedule == "step" else 1.0
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_drop_epoch, gamma=gamma)


class DeadlineCosine:
    """The flat-cosine schedule: after every optimiser step, `step(progress)` scales every group's rate to
    its full value until `flat` of the run is done, then to `final + (1 - final) * (1 + cos(pi * x)) / 2` of
    it, x going from 0 to 1 over the rest of the run; `progress` is the share of the run done (0 to 1). It
    rescales the rate relative to the factor it last applied, so it composes with the warm-up and the
    per-epoch scheduler on the same optimiser, as torch's chainable ones do."""

    def __init__(self, optimizer: torch.optim.Optimizer, final_factor: float, flat: float = 0.0) -> None:
        self.optimizer, self.final_factor, self.flat, self.factor = optimizer, final_factor, flat, 1.0

    def factor_at(self, progress: float) -> float:
        done = min(1.0, max(0.0, (progress - self.flat) / (1.0 - self.flat)))
        return self.final_factor + (1.0 - self.final_factor) * 0.5 * (1.0 + math.cos(math.pi * done))

    def step(self, progress: float) -> None:
        factor = self.factor_at(progress)
        for group in self.optimizer.param_groups:
            group["lr"] *= factor / self.factor
        self.factor = factor

    def state_dict(self) -> dict:
        return {"factor": self.factor}

    def load_state_dict(self, state: dict) -> None:
        self.factor = float(state["factor"])


def build_deadline_schedule(optimizer: torch.optim.Optimizer, config: OptimizerConfig) -> DeadlineCosine | None:
    """The per-step flat-cosine fitted to the run's end; None with the paper's step schedule."""
    if config.lr_schedule != "cosine":
        return None
    return DeadlineCosine(optimizer, config.final_lr_factor, config.flat_fraction)


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
