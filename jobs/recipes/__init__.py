"""Named training recipes: partial training configs, one YAML file each in this folder, layered under a
config file.

`recipe: fast` in a training config (or `--set recipe=fast`) fills in every value the recipe names that
the file and the `--set` overrides leave out: defaults < recipe < file < `--set`. A recipe never names
data sources, scaling, storage or tracking; `extends: NAME` layers a recipe over another. Read them:
`paper.yaml` (DETR as published), `fast.yaml` (a randomly initialised DETR that learns in minutes),
`fast_panoptic.yaml` (the same with the mask head, the panoptic benchmark's settings).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import yaml

from detr.errors import RaydetrError

FOLDER = Path(__file__).resolve().parent
RECIPES = tuple(sorted(p.stem for p in FOLDER.glob("*.yaml")))
"""The recipes shipped with raydetr."""


def recipe_path(name: str) -> Path:
    """The YAML file of a named recipe."""
    if name not in RECIPES:
        raise RaydetrError(f"unknown recipe {name!r}; choose from {list(RECIPES)}")
    return FOLDER / f"{name}.yaml"


def recipe(name: str) -> dict[str, Any]:
    """The named recipe's partial config (with what it extends filled in)."""
    values = yaml.safe_load(recipe_path(name).read_text()) or {}
    base = values.pop("extends", None)
    return fill(recipe(base), values) if base else values


def apply_recipe(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config (a nested dict) with its `recipe`'s values filled in where it has none."""
    name = config.get("recipe")
    return fill(recipe(name), config) if name else dict(config)


def fill(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `over` laid on top, section by section (a value of None in `over` clears a part)."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = fill(merged[key], value)
        else:
            merged[key] = value
    return merged
