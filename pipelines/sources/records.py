"""The image record: the one row format every source produces and every stage consumes.

A record names an image by a stable `key` (a path, `archive!member`, or the key an
ingested shard kept), says where its bytes are (`path`, or inline `bytes`), and
optionally carries its annotations as COCO boxes (x, y, w, h in pixels) with
category ids, crowd flags and areas. Keeping one schema means readers,
validation, ingest, training and labelling all speak the same language.
"""
from __future__ import annotations

import hashlib
from typing import Any, Iterable, Mapping

import numpy as np
import pyarrow as pa

RECORD_SCHEMA = pa.schema(
    [
        ("key", pa.string()),  # stable identity of the image
        ("source", pa.string()),  # the dataset/archive/annotation file it came from
        ("image_id", pa.int64()),
        ("path", pa.string()),  # where to read the bytes; "" when `bytes` is inline
        ("bytes", pa.binary()),  # inline bytes (archives, Parquet); null when read from `path`
        ("error_reason", pa.string()),  # set by a reader that already rejected this record
        ("error_detail", pa.string()),
        ("has_annotations", pa.bool_()),  # False: an unlabelled image (labelling); True: labelled, maybe no boxes
        ("boxes", pa.list_(pa.list_(pa.float64(), 4))),  # COCO (x, y, w, h) in pixels
        ("category_ids", pa.list_(pa.int64())),
        ("iscrowd", pa.list_(pa.int8())),
        ("area", pa.list_(pa.float64())),
        ("annotation_ids", pa.list_(pa.int64())),
        ("annotated_height", pa.int64()),  # size the annotation file recorded (0: unknown)
        ("annotated_width", pa.int64()),
        ("boxes_in_display_frame", pa.bool_()),  # True: boxes already follow EXIF orientation
        # COCO panoptic: the segment-id PNG of this image ("" when none); `annotation_ids` are then
        # the segment ids and each annotation's mask is its segment's pixels.
        ("panoptic_path", pa.string()),
        ("panoptic_png", pa.binary()),  # its bytes, read where `panoptic_path` is local (null: read the path)
    ]
)


def stable_image_id(key: str) -> int:
    """A positive 63-bit id derived from a key, the same on every machine and run."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big") >> 1


def make_record(
    key: str,
    *,
    source: str = "",
    image_id: int | None = None,
    path: str = "",
    data: bytes | None = None,
    error_reason: str = "",
    error_detail: str = "",
    annotations: Iterable[Mapping[str, Any]] | None = None,
    annotated_size: tuple[int, int] = (0, 0),
    boxes_in_display_frame: bool = False,
    panoptic_path: str = "",
) -> dict[str, Any]:
    """One record as a dict in RECORD_SCHEMA; `annotations` are COCO annotation dicts."""
    anns = list(annotations) if annotations is not None else []
    return {
        "key": key,
        "source": source,
        "image_id": stable_image_id(key) if image_id is None else int(image_id),
        "path": path,
        "bytes": data,
        "error_reason": error_reason,
        "error_detail": error_detail,
        "has_annotations": annotations is not None,
        "boxes": [[float(v) for v in a.get("bbox", (0, 0, 0, 0))] for a in anns],
        "category_ids": [int(a.get("category_id", -1)) for a in anns],
        "iscrowd": [int(bool(a.get("iscrowd", 0))) for a in anns],
        "area": [float(a.get("area", 0.0) or 0.0) for a in anns],
        "annotation_ids": [int(a.get("id", i)) for i, a in enumerate(anns)],
        "annotated_height": int(annotated_size[0]),
        "annotated_width": int(annotated_size[1]),
        "boxes_in_display_frame": bool(boxes_in_display_frame),
        "panoptic_path": panoptic_path,
        "panoptic_png": None,
    }


def records_table(records: Iterable[Mapping[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(list(records), schema=RECORD_SCHEMA)


def box_array(value: Any) -> np.ndarray:
    """Boxes from a record cell (nested lists or arrays, or None) as float64 [N, 4]."""
    if value is None:
        return np.zeros((0, 4), dtype=np.float64)
    if isinstance(value, np.ndarray) and value.dtype != object:
        return value.astype(np.float64, copy=False).reshape(-1, 4)
    items = list(value)
    if not items:
        return np.zeros((0, 4), dtype=np.float64)
    return np.asarray([np.asarray(b, dtype=np.float64) for b in items], dtype=np.float64).reshape(-1, 4)


def int_array(value: Any, dtype=np.int64) -> np.ndarray:
    if value is None:
        return np.zeros((0,), dtype=dtype)
    return np.asarray(list(value) if not isinstance(value, np.ndarray) else value, dtype=dtype).reshape(-1)


def float_array(value: Any) -> np.ndarray:
    return int_array(value, dtype=np.float64)
