"""The training checkpoint: a folder a run resumes from, exactly where it stopped.

Two files, so the model file is usable on its own:

- `model.pt`: what is validated and exported (the weights' average when training
  keeps one), in raydetr's checkpoint format (`detr.save_checkpoint`), so every job
  loads it as it loads any checkpoint;
- `train_state.pt`: what only a resumed run needs: optimiser, learning-rate
  schedulers, epoch and step counts, training seconds spent, every worker's random
  states and, with an average, the weights as trained.

Both load with `torch.load(weights_only=True)`: nothing in them runs code.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .checkpoint import save_checkpoint

MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"


def rng_state() -> dict[str, Any]:
    """This process's random states (torch, Python, NumPy) in a form `weights_only` loading accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


@dataclass
class TrainingParts:
    """What a checkpoint saves and restores; `warmup`, `ema` and `decay` are None when training has none."""

    model: nn.Module  # the weights as trained (unwrapped from DDP)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    warmup: Any = None
    ema: Any = None  # torch.optim.swa_utils.AveragedModel
    decay: Any = None  # detr.optim.DeadlineCosine

    @property
    def exported(self) -> nn.Module:
        """What is validated, checkpointed and exported: the weights' average when there is one."""
        return self.ema.module if self.ema is not None else self.model


@dataclass
class Progress:
    """Where a run stands: the next epoch to train, steps so far, training seconds spent, and each
    worker's random states (index = rank)."""

    epoch: int = 0
    global_step: int = 0
    train_seconds: float = 0.0
    rng: list[dict[str, Any]] = field(default_factory=list)


def save_training_checkpoint(directory: str, parts: TrainingParts, progress: Progress,
                             metadata: dict[str, Any]) -> None:
    """Write `model.pt` (with `metadata`) and `train_state.pt` into `directory`."""
    save_checkpoint(parts.exported, os.path.join(directory, MODEL_FILE), metadata=metadata)
    state = {
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(),
        "warmup": parts.warmup.state_dict() if parts.warmup is not None else None,
        "decay": parts.decay.state_dict() if parts.decay is not None else None,
        "epoch": progress.epoch,
        "global_step": progress.global_step,
        "train_seconds": progress.train_seconds,
        "rng": progress.rng,
        "trained_model": parts.model.state_dict() if parts.ema is not None else None,
        "ema_updates": int(parts.ema.n_averaged) if parts.ema is not None else 0,
    }
    torch.save(state, os.path.join(directory, STATE_FILE))


def load_training_checkpoint(directory: str, parts: TrainingParts) -> Progress:
    """Restore `parts` from a folder `save_training_checkpoint` wrote; returns where the run stood."""
    model_file = torch.load(os.path.join(directory, MODEL_FILE), map_location="cpu", weights_only=True)
    state = torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)
    if state.get("trained_model") is not None:
        # With an average, model.pt holds it and the state file the weights as trained.
        parts.model.load_state_dict(state["trained_model"])
        if parts.ema is not None:
            parts.ema.module.load_state_dict(model_file["model"])
            parts.ema.n_averaged.fill_(int(state["ema_updates"]))
    else:
        parts.model.load_state_dict(model_file["model"])
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    if parts.warmup is not None and state.get("warmup") is not None:
        parts.warmup.load_state_dict(state["warmup"])
    if parts.decay is not None and state.get("decay") is not None:
        parts.decay.load_state_dict(state["decay"])
    return Progress(int(state["epoch"]), int(state["global_step"]), float(state.get("train_seconds", 0.0)),
                    list(state["rng"]))


__all__ = ["MODEL_FILE", "STATE_FILE", "Progress", "TrainingParts", "load_training_checkpoint", "rng_state",
           "save_training_checkpoint", "set_rng_state"]
