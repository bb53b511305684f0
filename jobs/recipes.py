"""Named training recipes: partial training configs layered under a config file.

`recipe: fast` in a training config (or `--set recipe=fast`) fills in every value the
recipe names that the file and the `--set` overrides leave out: defaults < recipe <
file < `--set`. A recipe never names data sources, scaling, storage or tracking.

- `paper`: DETR as published (the defaults of `DETRConfig`, `OptimizerConfig` and the
  paper's augmentation): a pretrained, frozen-norm backbone, AdamW 1e-4 / 1e-5, 300 epochs.
- `fast`: what makes a randomly initialised DETR learn in minutes on small images
  (measured by `bench/convergence.py`): a backbone that learns from scratch (trainable
  batch norm, stem included, stopped at stride 8), sigmoid focal classification with the
  focal matching cost, a dense encoder head trained one-to-many whose best cells become the
  decoder's queries (two-stage) after non-maximum suppression, so each query starts on its
  own object, mask-head attention maps scaled to average 1 (models with masks learn to tell
  queries apart from the start), a higher learning rate with warm-up, no dropout, and the
  augmentation at about the images' own size. Every one of these is an option of the model
  library, off by default; official checkpoints still load into such a model (its extra
  heads start fresh) and fine-tune.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

RECIPES: dict[str, dict[str, Any]] = {
    "paper": {},
    "fast": {
        "model": {
            "backbone_norm": "batch",
            "train_backbone_stem": True,
            "backbone_stages": 2,
            "dropout": 0.0,
            "focal_loss": True,
            "set_cost_class": 2.0,
            "ce_loss_coef": 2.0,
            "encoder_aux_matches": 2,
            "two_stage": True,
            "proposal_nms": 0.5,
            "scaled_mask_attention": True,
        },
        "optimizer": {"lr": 2.0e-4, "lr_backbone": 2.0e-4, "warmup_steps": 100},
        "data": {"transforms": "native", "batch_size": 8},
    },
}


def recipe(name: str) -> dict[str, Any]:
    """A copy of the named recipe's partial config."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose from {sorted(RECIPES)}")
    return copy.deepcopy(RECIPES[name])


def apply_recipe(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config (a nested dict) with its `recipe`'s values filled in where it has none."""
    name = config.get("recipe")
    return _fill(recipe(name), config) if name else dict(config)


def _fill(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _fill(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged
