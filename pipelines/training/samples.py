"""One training or evaluation sample from a record: load, validate, drop crowd boxes, transform.

The same function feeds the Ray Data pipeline and the plain PyTorch Dataset
(the benchmark's baseline), so both produce identical samples for the same
(seed, epoch, image id).
"""
from __future__ import annotations

from typing import Any, Collection, Mapping

import numpy as np
from torchvision.transforms import v2

from pipelines.training.transforms import apply_transform, image_seed
from pipelines.validation import errors as E
from pipelines.validation.decode import DecodeLimits
from pipelines.validation.loading import LoadedImage, load_record

SAMPLE_COLUMNS = ("image", "boxes", "labels", "image_id", "orig_size", "size", "area", "iscrowd")
MASK_COLUMN = "masks"
"""Panoptic samples also carry `masks`: bool [N, h, w], one per box, at the sample's size."""


def make_sample(
    record: Mapping[str, Any],
    transform: v2.Transform,
    *,
    seed: int | None,
    epoch: int,
    known_categories: Collection[int] | None,
    limits: DecodeLimits = DecodeLimits(),
    with_masks: bool | None = None,
) -> tuple[dict[str, np.ndarray] | None, LoadedImage | None, list[E.ErrorRecord]]:
    """(sample or None, the loaded image, errors). A sample has SAMPLE_COLUMNS: `image` uint8
    [3,H,W], `boxes` float32 [N,4] normalised (cx, cy, w, h), `labels` int64 [N] (COCO ids),
    `image_id`, `orig_size` and `size` int64 (h, w), `area` float32 [N], `iscrowd` int64 [N];
    and `masks` (bool [N, h, w]) when `with_masks` (default: when the record is panoptic)."""
    loaded, errors = load_record(record, known_categories, limits)
    if loaded is None:
        return None, None, errors
    ann = loaded.annotations
    h, w = loaded.image.height, loaded.image.width
    if with_masks is None:
        with_masks = bool(record.get("panoptic_path")) or (ann is not None and ann.masks is not None)
    masks = np.zeros((0, h, w), dtype=bool) if with_masks else None
    if ann is not None and len(ann.boxes):
        keep = ann.iscrowd == 0  # DETR trains without crowd boxes; COCO eval ignores them
        boxes, labels, area = ann.boxes[keep], ann.category_ids[keep], ann.area[keep]
        if ann.masks is not None:
            masks = ann.masks[keep]
    else:
        boxes, labels, area = np.zeros((0, 4)), np.zeros((0,), np.int64), np.zeros((0,))
    per_image_seed = None if seed is None else image_seed(seed, epoch, loaded.image_id)
    out = apply_transform(transform, loaded.image.array, boxes, labels, area, per_image_seed, masks=masks)
    sample = {
        "image": out["image"].numpy(),
        "boxes": out["boxes"].numpy().astype(np.float32),
        "labels": out["labels"].numpy().astype(np.int64),
        "image_id": np.int64(loaded.image_id),
        "orig_size": np.array([loaded.image.height, loaded.image.width], dtype=np.int64),
        "size": np.array(out["size"], dtype=np.int64),
        "area": out["area"].numpy().astype(np.float32),
        "iscrowd": np.zeros(len(out["labels"]), dtype=np.int64),
    }
    if masks is not None:
        sample[MASK_COLUMN] = out["masks"].numpy()
    return sample, loaded, errors
