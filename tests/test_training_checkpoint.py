"""The training checkpoint: a run resumed from it continues exactly as the run that wrote it."""
import random

import numpy as np
import torch

from detr import SetCriterion, build_model, load_checkpoint
from detr.ema import ema_model
from detr.engine import train_step
from detr.optim import OptimizerConfig, build_lr_scheduler, build_optimizer, build_warmup_scheduler
from detr.training_checkpoint import (MODEL_FILE, Progress, TrainingParts, load_training_checkpoint, rng_state,
                                      save_training_checkpoint, set_rng_state)
from test_engine import tiny_batch

OPTIMIZER = OptimizerConfig(lr=1e-3, lr_backbone=1e-4, warmup_steps=5, lr_drop_epoch=1, ema_decay=0.9)


def fresh_parts() -> TrainingParts:
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=4, dropout=0.0).train()
    optimizer = build_optimizer(model, OPTIMIZER)
    return TrainingParts(model, optimizer, build_lr_scheduler(optimizer, OPTIMIZER),
                         build_warmup_scheduler(optimizer, OPTIMIZER), ema_model(model, OPTIMIZER.ema_decay))


def step(parts: TrainingParts, criterion) -> None:
    noise = torch.randn(())  # a random draw in the step: the random states must resume too
    train_step(parts.model, criterion, parts.optimizer, [tiny_batch()], clip_max_norm=0.1)
    with torch.no_grad():
        parts.model.class_embed.bias.add_(noise * 1e-3)
    parts.warmup.step()
    parts.ema.update_parameters(parts.model)


def test_a_resumed_run_continues_exactly(tmp_path):
    criterion = SetCriterion.from_config(build_model("tiny", num_classes=4).config)
    original = fresh_parts()
    for _ in range(2):
        step(original, criterion)
    original.scheduler.step()
    random.seed(3)
    np.random.seed(3)
    save_training_checkpoint(str(tmp_path), original, Progress(1, 2, 12.5, [rng_state()]), {"categories": []})
    step(original, criterion)

    resumed = fresh_parts()
    progress = load_training_checkpoint(str(tmp_path), resumed)
    assert (progress.epoch, progress.global_step, progress.train_seconds) == (1, 2, 12.5)
    set_rng_state(progress.rng[0])
    assert random.random() == random.Random(3).random()
    step(resumed, criterion)
    for a, b in zip(original.model.state_dict().values(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(original.ema.module.state_dict().values(), resumed.ema.module.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert resumed.scheduler.last_epoch == 1 and resumed.warmup.last_epoch == 3
    assert int(resumed.ema.n_averaged) == 3


def test_the_model_file_holds_the_average_and_loads_alone(tmp_path):
    criterion = SetCriterion.from_config(build_model("tiny", num_classes=4).config)
    parts = fresh_parts()
    step(parts, criterion)
    step(parts, criterion)
    save_training_checkpoint(str(tmp_path), parts, Progress(1, 2), {"epoch": 0})
    model, metadata = load_checkpoint(tmp_path / MODEL_FILE)
    assert metadata["epoch"] == 0
    averaged = parts.ema.module.state_dict()
    assert all(torch.equal(v, averaged[k]) for k, v in model.state_dict().items())
    assert not torch.equal(model.class_embed.weight, parts.model.class_embed.weight)
