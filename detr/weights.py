"""The one rule for loading weights into a model that differs from the one they were saved from.

Fine-tuning starts from weights of another model: an official checkpoint, a detector under a model
that adds a mask head, a panoptic model's detector alone, a model of another class count, or a paper
model under one with our parts (`recipe: fast`). What may start fresh is exactly: every head whose shape
follows the class count (`CLASS_HEADS`) when the class counts differ, the mask head when the weights
have none, and the weights of our own parts
(`NON_OFFICIAL_PREFIXES`) when the weights lack them. Anything else missing or unexpected is an error
naming the keys: half-loaded weights must never pass silently.
"""
from __future__ import annotations

from typing import Mapping

from torch import Tensor, nn

from .errors import RaydetrError
from .model import NON_OFFICIAL_PREFIXES
from .segmentation import DETECTOR_PREFIX, MASK_HEAD_PREFIXES

CLASS_HEADS = ("class_embed.", "dense_head.class_embed.", "semantic_head.classifier.")
"""The layers with one output per class (the decoder's, the dense encoder head's, the semantic head's)."""


def _detector_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The detector's weights of a detector or panoptic state dict, without the `detr.` prefix."""
    if not any(k.startswith(DETECTOR_PREFIX) for k in state):
        return dict(state)
    return {k[len(DETECTOR_PREFIX):]: v for k, v in state.items() if k.startswith(DETECTOR_PREFIX)}


def fit_state_dict(state: Mapping[str, Tensor], model: nn.Module) -> tuple[dict[str, Tensor], tuple[str, ...]]:
    """`state` in `model`'s layout, and the key prefixes (in that layout) allowed to start fresh."""
    panoptic = hasattr(model, "detr")
    prefix = DETECTOR_PREFIX if panoptic else ""
    target = model.state_dict()
    detector = _detector_keys(state)
    fresh = tuple(prefix + p for p in NON_OFFICIAL_PREFIXES)
    for head in CLASS_HEADS:
        saved, wanted = detector.get(f"{head}weight"), target.get(f"{prefix}{head}weight")
        if saved is not None and wanted is not None and saved.shape != wanted.shape:
            detector = {k: v for k, v in detector.items() if not k.startswith(head)}
            fresh += (prefix + head,)
    fitted = {prefix + k: v for k, v in detector.items()}
    if panoptic:
        heads = {k: v for k, v in state.items() if k.startswith(MASK_HEAD_PREFIXES)}
        fitted.update(heads)
        fresh += () if heads else MASK_HEAD_PREFIXES
    return fitted, fresh


def load_weights(model: nn.Module, state: Mapping[str, Tensor], where: str = "weights") -> nn.Module:
    """Load `state` (a detector's or a panoptic model's, ours or official keys already renamed) into
    `model` by the rule above; returns `model`."""
    fitted, fresh = fit_state_dict(state, model)
    try:
        missing, unexpected = model.load_state_dict(fitted, strict=False)
    except RuntimeError as exc:
        raise RaydetrError(f"{where} do not fit the model: {exc}") from exc
    missing = [k for k in missing if not k.startswith(fresh)]
    if missing or unexpected:
        raise RaydetrError(f"{where} do not fit the model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    return model
