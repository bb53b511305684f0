"""COCO panoptic format: segment-id PNGs plus a JSON of `segments_info`, in and out.

A COCO panoptic dataset is a JSON (`images`, `annotations` with one entry per
image: `file_name` of its PNG and `segments_info` [{id, category_id, iscrowd,
bbox, area}], and `categories` carrying `isthing`) and a folder of PNGs whose
pixels encode segment ids in RGB (id = R + 256 G + 256^2 B; 0 is unlabelled).

`decode_segments` checks one image's PNG against its image and its JSON entry,
the way validation checks boxes: a PNG that cannot be read or whose size differs
from the image rejects the image; a segment listed in the JSON but absent from
the PNG, or present in the PNG but not in the JSON, is an annotation-level error
(the segment is dropped; unlisted pixels become unlabelled). Unknown categories
are rejected by the usual annotation check.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from detr.errors import RaydetrError
from pipelines.validation import errors as E
from pipelines.validation.errors import (PANOPTIC_PNG_ERROR, PANOPTIC_SIZE_MISMATCH, SEGMENT_MISSING_FROM_JSON,
                                         SEGMENT_MISSING_FROM_PNG)


def rgb2id(color: np.ndarray) -> np.ndarray:
    """[H, W, 3] uint8 -> [H, W] int64 segment ids (COCO panoptic encoding)."""
    color = np.asarray(color).astype(np.int64)
    return color[..., 0] + 256 * color[..., 1] + 256 * 256 * color[..., 2]


def id2rgb(ids: np.ndarray) -> np.ndarray:
    """[H, W] integer segment ids -> [H, W, 3] uint8 (COCO panoptic encoding)."""
    ids = np.asarray(ids).astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= 256 ** 3):
        raise RaydetrError("segment ids must be in [0, 2^24)")
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)


def encode_panoptic_png(ids: Any) -> bytes:
    """A segment-id map (numpy or torch [H, W]) as COCO panoptic PNG bytes."""
    array = ids.cpu().numpy() if hasattr(ids, "cpu") else np.asarray(ids)
    buf = io.BytesIO()
    Image.fromarray(id2rgb(array)).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def decode_panoptic_png(data: bytes, name: str = "") -> np.ndarray:
    """COCO panoptic PNG bytes -> [H, W] int64 segment ids; raises PipelineError(panoptic_png_error)."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        array = np.asarray(img.convert("RGB"))
    except Exception as exc:  # noqa: BLE001 - any failure of a mask file is the same reason
        raise E.PipelineError(PANOPTIC_PNG_ERROR, f"{name or '<png>'}: cannot read the panoptic PNG ({exc})") from None
    return rgb2id(array)


@dataclass
class Segments:
    """One image's checked segments: masks aligned with `segment_ids`, plus the rejections."""

    segment_ids: np.ndarray  # int64 [N]
    masks: np.ndarray  # bool [N, H, W]
    rejected: list[tuple[str, str]] = field(default_factory=list)


def decode_segments(data: bytes, name: str, image_size: tuple[int, int], segment_ids: Sequence[int]) -> Segments:
    """Masks of the listed segments from a panoptic PNG, checked against the image and the JSON entry."""
    ids = decode_panoptic_png(data, name)
    if tuple(ids.shape) != tuple(image_size):
        raise E.PipelineError(PANOPTIC_SIZE_MISMATCH, f"{name}: the panoptic PNG is {ids.shape[1]}x{ids.shape[0]} "
                                                      f"but its image is {image_size[1]}x{image_size[0]}")
    present = set(np.unique(ids).tolist()) - {0}
    listed = [int(s) for s in segment_ids]
    rejected = []
    for sid in listed:
        if sid not in present:
            rejected.append((SEGMENT_MISSING_FROM_PNG, f"segment {sid} is listed in the JSON but has no pixel in {name}"))
    for sid in sorted(present - set(listed)):
        rejected.append((SEGMENT_MISSING_FROM_JSON,
                         f"segment id {sid} appears in {name} but not in the JSON's segments_info (left unlabelled)"))
    kept = np.asarray([s for s in listed if s in present], dtype=np.int64)
    masks = ids[None] == kept[:, None, None] if len(kept) else np.zeros((0, *ids.shape), dtype=bool)
    return Segments(kept, masks, rejected)


def segments_from_masks(masks: np.ndarray) -> np.ndarray:
    """bool [N, H, W] non-overlapping masks -> a segment-id map [H, W] with ids 1..N (0 elsewhere)."""
    ids = np.zeros(masks.shape[1:], dtype=np.int64)
    for i, m in enumerate(masks, start=1):
        ids[m] = i
    return ids


def panoptic_categories(categories: Sequence[Mapping[str, Any]]) -> dict[int, bool]:
    """{category id: isthing} from COCO panoptic categories (a category without `isthing` is a thing)."""
    return {int(c["id"]): bool(c.get("isthing", 1)) for c in categories}


__all__ = [
    "PANOPTIC_PNG_ERROR",
    "PANOPTIC_SIZE_MISMATCH",
    "SEGMENT_MISSING_FROM_JSON",
    "SEGMENT_MISSING_FROM_PNG",
    "Segments",
    "decode_panoptic_png",
    "decode_segments",
    "encode_panoptic_png",
    "id2rgb",
    "panoptic_categories",
    "rgb2id",
    "segments_from_masks",
]
