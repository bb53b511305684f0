"""Panoptic segments as label-row values, and back to masks.

A row's `segments` list holds, per segment, what `segment_preprocessed` gives
(id, category, name, is-thing, area, score, bbox) and its mask at the original
image size as COCO RLE (`{"size": [h, w], "counts": str}`, pycocotools' compressed
string), so a reader needs the table alone for any one segment's mask, while the
panoptic PNG beside the table holds the whole id map (ids match `id`).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa

from detr import rle_to_masks
from pipelines.labelling.schema import SEGMENT_TYPE

_SEGMENT_KEYS = [f.name for f in SEGMENT_TYPE]


def segment_row(segment: Mapping[str, Any]) -> dict[str, Any]:
    """One segment of `segment_preprocessed` as a SEGMENT_TYPE value (the fields the row keeps)."""
    row = {name: segment[name] for name in _SEGMENT_KEYS}
    row["rle"] = {"size": [int(v) for v in segment["rle"]["size"]], "counts": str(segment["rle"]["counts"])}
    return row


def segments_array(per_image: Sequence[Sequence[Mapping[str, Any]] | None]) -> pa.Array:
    """The `segments` column for a batch: one list per image (None, an error row, becomes an empty list)."""
    return pa.array([[segment_row(s) for s in segments or []] for segments in per_image], pa.list_(SEGMENT_TYPE))


def segment_masks(segments: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """A row's segments -> their masks, bool [N, H, W], decoded from the RLE (N = 0 gives [0, 0, 0])."""
    return rle_to_masks([s["rle"] for s in segments])


def id_map_from_segments(segments: Sequence[Mapping[str, Any]], height: int, width: int) -> np.ndarray:
    """The segment-id map [H, W] (int64, 0 where no segment) that a row's segments describe."""
    ids = np.zeros((height, width), dtype=np.int64)
    for segment, mask in zip(segments, segment_masks(segments)):
        ids[mask] = int(segment["id"])
    return ids
