"""Reading the flat `DETRConfig` layout that checkpoints saved before the optional parts were nested.

Models registered and checkpoints written until then store every option as a top-level field
(`focal_loss`, `encoder_aux_matches`, `two_stage`, `proposal_nms`, `masks`, ...). This turns such a
mapping into today's layout, so those files load as they did; a mapping in today's layout passes
through unchanged.
"""
from __future__ import annotations

from typing import Any, Mapping

FLAT_OPTIONS = {
    # flat field: (part, field in the part); the first of each part says whether the part is on
    "focal_loss": ("focal", None), "focal_alpha": ("focal", "alpha"), "focal_gamma": ("focal", "gamma"),
    "encoder_aux_matches": ("dense_head", "matches"), "encoder_mask_assignment": ("dense_head", "mask_assignment"),
    "two_stage": ("two_stage", None), "proposal_nms": ("two_stage", "nms"),
    "proposal_nms_per_class": ("two_stage", "nms_per_class"), "proposal_content": ("two_stage", "content"),
    "masks": ("mask_head", None), "freeze_detector": ("mask_head", "freeze_detector"),
    "scaled_mask_attention": ("mask_head", "scaled_attention"), "mask_loss_coef": ("mask_head", "mask_loss_coef"),
    "dice_loss_coef": ("mask_head", "dice_loss_coef"),
    "semantic_loss_coef": ("semantic_head", "loss_coef"),
}
"""The flat fields and where each lives now."""


def nest_flat_options(values: Mapping[str, Any]) -> dict[str, Any]:
    """`values` with any flat option fields moved into their parts (a part whose switch is off, or whose
    count or weight is 0, is None); other keys are kept as they are."""
    def is_flat(key: str, value: Any) -> bool:  # `two_stage` names a part today: flat only as a switch
        return key in FLAT_OPTIONS and (key != "two_stage" or isinstance(value, bool))

    out = {k: v for k, v in values.items() if not is_flat(k, v)}
    flat = {k: v for k, v in values.items() if is_flat(k, v)}
    if not flat:
        return out
    parts: dict[str, dict[str, Any]] = {}
    switched_on: dict[str, bool] = {}
    for key, value in flat.items():
        part, field = FLAT_OPTIONS[key]
        if field is None:
            switched_on[part] = bool(value)
        else:
            parts.setdefault(part, {})[field] = value
    switched_on.setdefault("dense_head", bool(flat.get("encoder_aux_matches")))
    switched_on.setdefault("semantic_head", bool(flat.get("semantic_loss_coef")))
    for part in {p for p, _ in FLAT_OPTIONS.values()}:
        if part not in out:
            out[part] = parts.get(part, {}) if switched_on.get(part) else None
    return out
