"""Checking one image's annotations against the decoded image and the category table.

COCO's rules, applied the way its own tools read them: a box is clipped to the
image (a repair), rejected when nothing of it is left inside (`box_out_of_image`)
or when it has no positive width and height to begin with (`degenerate_box`);
unknown category ids are rejected (`unknown_category`); `iscrowd` is kept as
given (training drops crowd boxes, evaluation ignores them, as COCO does); an
image with no annotations stays, as a negative example.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Collection

import numpy as np

from pipelines.validation import errors as E

# A clip that moves an edge by less than this (pixels) is rounding, not a repair.
_CLIP_TOLERANCE = 1e-3


@dataclass
class CheckedAnnotations:
    """The annotations that survived, in COCO (x, y, w, h) pixels, plus what was rejected or repaired."""

    boxes: np.ndarray  # float64 [N, 4]
    category_ids: np.ndarray  # int64 [N]
    iscrowd: np.ndarray  # int8 [N]
    area: np.ndarray  # float64 [N]
    annotation_ids: np.ndarray  # int64 [N]
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (reason, detail)
    repaired: int = 0
    masks: np.ndarray | None = None  # bool [N, H, W] for panoptic records (aligned with the boxes)


def check_annotations(
    boxes: np.ndarray,
    category_ids: np.ndarray,
    iscrowd: np.ndarray,
    area: np.ndarray,
    annotation_ids: np.ndarray,
    width: int,
    height: int,
    known_categories: Collection[int] | None,
) -> CheckedAnnotations:
    """Validate and clip one image's annotations; see the module docstring for the rules."""
    import torch
    from torchvision.ops import box_convert, clip_boxes_to_image

    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    n = len(boxes)
    category_ids = np.asarray(category_ids, dtype=np.int64).reshape(-1)
    iscrowd = np.asarray(iscrowd, dtype=np.int8).reshape(-1) if len(iscrowd) else np.zeros(n, np.int8)
    area = np.asarray(area, dtype=np.float64).reshape(-1) if len(area) else np.zeros(n)
    annotation_ids = np.asarray(annotation_ids, dtype=np.int64).reshape(-1) if len(annotation_ids) else np.arange(n)
    rejected: list[tuple[str, str]] = []
    if n == 0:
        return CheckedAnnotations(boxes, category_ids, iscrowd, area, annotation_ids, rejected, 0)

    xyxy = box_convert(torch.as_tensor(boxes), "xywh", "xyxy")
    clipped = clip_boxes_to_image(xyxy, (int(height), int(width)))
    clipped_wh = (clipped[:, 2:] - clipped[:, :2]).numpy()
    keep = np.ones(n, dtype=bool)
    repaired = 0
    known = set(int(c) for c in known_categories) if known_categories is not None else None
    for i in range(n):
        what = f"annotation {annotation_ids[i]} box {np.round(boxes[i], 2).tolist()}"
        if known is not None and int(category_ids[i]) not in known:
            rejected.append((E.UNKNOWN_CATEGORY, f"{what}: category id {int(category_ids[i])} is not in the category table"))
            keep[i] = False
        elif not np.all(np.isfinite(boxes[i])) or boxes[i, 2] <= 0 or boxes[i, 3] <= 0:
            rejected.append((E.DEGENERATE_BOX, f"{what}: width and height must be positive and finite"))
            keep[i] = False
        elif clipped_wh[i, 0] <= 0 or clipped_wh[i, 1] <= 0:
            rejected.append((E.BOX_OUT_OF_IMAGE, f"{what}: lies outside the {width}x{height} image"))
            keep[i] = False
        elif np.abs(clipped[i].numpy() - xyxy[i].numpy()).max() > _CLIP_TOLERANCE:
            repaired += 1
    out_boxes = box_convert(clipped[torch.as_tensor(keep)], "xyxy", "xywh").numpy().astype(np.float64)
    out_area = area[keep].copy()
    missing = ~(out_area > 0)
    out_area[missing] = out_boxes[missing, 2] * out_boxes[missing, 3]
    return CheckedAnnotations(
        boxes=out_boxes,
        category_ids=category_ids[keep],
        iscrowd=iscrowd[keep],
        area=out_area,
        annotation_ids=annotation_ids[keep],
        rejected=rejected,
        repaired=repaired,
    )
