"""Named training recipes layer under a config file; the warm-up composes with the epoch schedule."""
from __future__ import annotations

import math

import pytest
import torch

from detr import DenseHead, FocalLoss, MaskHead, SemanticHead, TwoStage
from detr.errors import RaydetrError
from detr.optim import OptimizerConfig, build_deadline_schedule, build_lr_scheduler, build_warmup_scheduler
from jobs.config_files import ConfigError
from jobs.recipes import RECIPES, apply_recipe, recipe_path
from jobs.train_config import load_train_config


def test_a_recipe_fills_in_what_the_file_leaves_out_and_the_file_wins(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("recipe: fast\ndata: {train: x.json, batch_size: 2}\nmodel: {preset: tiny, dense_head: {matches: 3}}\n")
    config = load_train_config(path, ["optimizer.lr=3e-4", "model.two_stage.nms=0.6"])
    assert config.recipe == "fast"
    assert config.data.batch_size == 2 and config.data.transforms == "native"
    assert config.optimizer.lr == pytest.approx(3e-4)  # --set beats the recipe
    assert (config.optimizer.lr_backbone, config.optimizer.warmup_steps) == (pytest.approx(4e-4), 100)
    assert (config.optimizer.lr_schedule, config.optimizer.flat_fraction) == ("cosine", 0.7)
    model = config.model_config(num_classes=5)
    assert model.dense_head == DenseHead(matches=3) and model.hidden_dim == 64  # the file and the preset win
    assert model.two_stage == TwoStage(nms=0.6, content=True)  # a --set inside a part the recipe names
    assert model.focal == FocalLoss() and model.backbone_norm == "batch" and model.dropout == 0.0
    assert (model.backbone_stages, model.set_cost_class, model.ce_loss_coef) == (2, 2.0, 2.0)
    assert model.mask_head is None  # `fast` adds no mask head to a detector
    off = load_train_config(None, ["data.train=x.json", "recipe=fast", "model.preset=tiny", "model.two_stage=null"])
    assert off.model_config(5).two_stage is None and off.model_config(5).dense_head == DenseHead(2)


def test_fast_panoptic_extends_fast_with_the_mask_head_and_the_panoptic_settings():
    config = load_train_config(None, ["data.train=x.json", "recipe=fast_panoptic", "model.preset=tiny_panoptic"])
    model = config.model_config(num_classes=5)
    assert model.two_stage == TwoStage(nms=0.5, nms_per_class=True, content=True)
    assert model.dense_head == DenseHead(matches=2, mask_assignment=True)
    assert model.semantic_head == SemanticHead(loss_coef=2.0)
    assert model.mask_head == MaskHead(freeze_detector=False, scaled_attention=True)
    assert model.focal == FocalLoss() and model.backbone_stages == 2 and config.data.transforms == "native"
    assert (config.optimizer.lr, config.optimizer.lr_schedule) == (pytest.approx(2e-4), "step")
    assert set(RECIPES) == {"paper", "fast", "fast_panoptic"}
    assert recipe_path("fast").read_text().startswith("# What makes a randomly initialised DETR learn")


def test_the_paper_recipe_is_the_defaults_and_unknown_recipes_are_refused():
    plain = load_train_config(None, ["data.train=x.json"])
    paper = load_train_config(None, ["data.train=x.json", "recipe=paper"])
    assert paper.optimizer == plain.optimizer and paper.data == plain.data
    assert paper.model_config(5) == plain.model_config(5)
    with pytest.raises((ValueError, ConfigError), match="unknown recipe"):
        load_train_config(None, ["data.train=x.json", "recipe=fastest"])
    assert apply_recipe({"data": {"train": "x"}}) == {"data": {"train": "x"}}
    assert load_train_config(None, ["data.train=x.json", "tracking.exports=[onnx]"]).tracking.exports == ("onnx",)
    with pytest.raises(ConfigError, match="tracking.exports: unknown format 'tflite'"):
        load_train_config(None, ["data.train=x.json", "tracking.exports=[tflite]"])


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


def test_the_cosine_schedule_composes_with_the_warmup_and_ends_at_its_final_share():
    model = torch.nn.Linear(2, 2)
    config = OptimizerConfig(lr=1e-3, lr_backbone=1e-4, warmup_steps=4, lr_drop_epoch=1, lr_schedule="cosine",
                             final_lr_factor=0.1)
    optimizer = torch.optim.AdamW([{"params": [model.weight], "lr": 1e-3}, {"params": [model.bias], "lr": 1e-4}])
    epochs = build_lr_scheduler(optimizer, config)
    warmup = build_warmup_scheduler(optimizer, config)
    decay = build_deadline_schedule(optimizer, config)
    progress = [0.0, 0.1, 0.2, 0.3, 0.5, 1.0, 1.5]
    seen = []
    for done in progress:
        optimizer.step()
        warmup.step()
        decay.step(done)
        seen.append([g["lr"] for g in optimizer.param_groups])
    cosine = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(d, 1.0))) for d in progress]
    ramp = [4.375e-4 / 1e-3, 6.25e-4 / 1e-3, 8.125e-4 / 1e-3, 1.0, 1.0, 1.0, 1.0]
    assert [lr for lr, _ in seen] == pytest.approx([1e-3 * r * c for r, c in zip(ramp, cosine)])
    assert [lr for _, lr in seen] == pytest.approx([1e-4 * r * c for r, c in zip(ramp, cosine)])
    assert seen[-1] == pytest.approx([1e-4, 1e-5])  # the final share, and no further past the end
    epochs.step()  # the paper's epoch drop does not apply on top of the cosine
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)

    resumed = build_deadline_schedule(optimizer, config)
    resumed.load_state_dict(decay.state_dict())
    resumed.step(0.5)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.55)
    flat = build_deadline_schedule(optimizer, OptimizerConfig(lr_schedule="cosine", flat_fraction=0.6,
                                                              final_lr_factor=0.0))
    assert [flat.factor_at(d) for d in (0.0, 0.6, 0.8, 1.0)] == pytest.approx([1.0, 1.0, 0.5, 0.0])
    assert build_deadline_schedule(optimizer, OptimizerConfig()) is None
    with pytest.raises(RaydetrError, match="lr_schedule 'linear'"):
        OptimizerConfig(lr_schedule="linear")


def test_print_config_shows_every_key_as_resolved(capsys):
    import yaml

    from jobs.cli import main

    assert main(["train", "--print-config", "--set", "recipe=fast", "--set", "schedule.epochs=7"]) == 0
    printed = capsys.readouterr().out
    config = yaml.safe_load(printed)
    assert printed.startswith("# model.num_classes: the data's largest category id + 1")
    assert config["schedule"]["epochs"] == 7 and config["data"]["transforms"] == "native"  # --set, then the recipe
    assert config["model"]["focal"] is not None and config["model"]["backbone"] == "resnet50"  # recipe, then defaults
    assert "num_classes" not in config["model"] and config["optimizer"]["warmup_steps"] == 100
