"""Named training recipes layer under a config file; the warm-up composes with the epoch schedule."""
from __future__ import annotations

import pytest
import torch

from detr.optim import OptimizerConfig, build_lr_scheduler, build_optimizer, build_warmup_scheduler
from jobs.config_files import ConfigError
from jobs.recipes import RECIPES, apply_recipe
from jobs.train_config import load_train_config


def test_a_recipe_fills_in_what_the_file_leaves_out_and_the_file_wins(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("recipe: fast\ndata: {train: x.json, batch_size: 2}\nmodel: {preset: tiny, encoder_aux_matches: 3}\n")
    config = load_train_config(path, ["optimizer.lr=3e-4"])
    fast = RECIPES["fast"]
    assert config.recipe == "fast"
    assert config.data.batch_size == 2 and config.data.transforms == fast["data"]["transforms"]
    assert config.optimizer.lr == pytest.approx(3e-4)  # --set beats the recipe
    assert config.optimizer.lr_backbone == fast["optimizer"]["lr_backbone"]
    assert config.optimizer.warmup_steps == fast["optimizer"]["warmup_steps"]
    model = config.model_config(num_classes=5)
    assert model.encoder_aux_matches == 3 and model.hidden_dim == 64  # the file and the preset beat the recipe
    assert model.focal_loss and model.backbone_norm == "batch" and model.dropout == 0.0


def test_the_paper_recipe_is_the_defaults_and_unknown_recipes_are_refused():
    plain = load_train_config(None, ["data.train=x.json"])
    paper = load_train_config(None, ["data.train=x.json", "recipe=paper"])
    assert paper.optimizer == plain.optimizer and paper.data == plain.data
    assert paper.model_config(5) == plain.model_config(5)
    with pytest.raises((ValueError, ConfigError), match="unknown recipe"):
        load_train_config(None, ["data.train=x.json", "recipe=fastest"])
    assert apply_recipe({"data": {"train": "x"}}) == {"data": {"train": "x"}}


def test_warmup_ramps_every_group_then_the_epoch_drop_applies():
    model = torch.nn.Linear(2, 2)
    config = OptimizerConfig(lr=1e-3, lr_backbone=1e-4, warmup_steps=4, lr_drop_epoch=1, lr_drop_factor=0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    epochs = build_lr_scheduler(optimizer, config)
    warmup = build_warmup_scheduler(optimizer, config)
    seen = []
    for _ in range(5):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        warmup.step()
    assert seen == pytest.approx([2.5e-4, 4.375e-4, 6.25e-4, 8.125e-4, 1e-3])  # linear over 4 steps
    epochs.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
    assert build_warmup_scheduler(optimizer, OptimizerConfig()) is None
