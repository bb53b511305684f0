"""Parquet shards written by `detr ingest`: bytes, sizes and validated annotations in one table.

The category table travels in the Parquet schema metadata, so a folder of
shards is self-describing. Boxes in shards are already validated and in the
display frame (EXIF orientation applied), which the records say.
"""
from __future__ import annotations

import json
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.sources.base import Source, Unit
from pipelines.sources.records import RECORD_SCHEMA

CATEGORIES_METADATA_KEY = b"raydetr.categories"
SHARD_FORMAT_KEY = b"raydetr.format"
SHARD_FORMAT = b"raydetr-detection-shard-v1"

SHARD_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("key", pa.string()),
        ("source", pa.string()),
        ("image", pa.binary()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("content_hash", pa.string()),
        ("has_annotations", pa.bool_()),
        ("boxes", pa.list_(pa.list_(pa.float32(), 4))),  # COCO (x, y, w, h) pixels, display frame
        ("labels", pa.list_(pa.int64())),  # COCO category ids
        ("iscrowd", pa.list_(pa.int8())),
        ("area", pa.list_(pa.float32())),
    ]
)


def shard_schema(categories: list[dict] | None) -> pa.Schema:
    meta = {SHARD_FORMAT_KEY: SHARD_FORMAT}
    if categories is not None:
        meta[CATEGORIES_METADATA_KEY] = json.dumps(categories, sort_keys=True).encode()
    return SHARD_SCHEMA.with_metadata(meta)


def categories_from_schema(schema: pa.Schema) -> list[dict] | None:
    meta = schema.metadata or {}
    return json.loads(meta[CATEGORIES_METADATA_KEY]) if CATEGORIES_METADATA_KEY in meta else None


def shards_to_records(table: pa.Table) -> pa.Table:
    """Shard rows (SHARD_SCHEMA) -> records (RECORD_SCHEMA), columnar, no Python loops."""
    n = table.num_rows
    boxes = table["boxes"].cast(pa.list_(pa.list_(pa.float64(), 4)))
    columns = {
        "key": table["key"],
        "source": table["source"],
        "image_id": table["image_id"],
        "path": pa.array([""] * n, pa.string()),
        "bytes": table["image"],
        "error_reason": pa.array([""] * n, pa.string()),
        "error_detail": pa.array([""] * n, pa.string()),
        "has_annotations": table["has_annotations"],
        "panoptic_path": pa.array([""] * n, pa.string()),
        "panoptic_png": pa.nulls(n, pa.binary()),
        "boxes": boxes,
        "category_ids": table["labels"],
        "iscrowd": table["iscrowd"],
        "area": table["area"].cast(pa.list_(pa.float64())),
        "annotation_ids": pa.array([list(range(len(b))) for b in table["labels"].to_pylist()], pa.list_(pa.int64())),
        "annotated_height": table["height"].cast(pa.int64()),
        "annotated_width": table["width"].cast(pa.int64()),
        "boxes_in_display_frame": pa.array([True] * n, pa.bool_()),
    }
    return pa.table([columns[f.name] for f in RECORD_SCHEMA], schema=RECORD_SCHEMA)


def iter_parquet(unit: Unit) -> Iterator[dict]:
    fs, path = storage.resolve(unit.payload)
    pf = pq.ParquetFile(path, filesystem=fs)
    for batch in pf.iter_batches(batch_size=256):
        yield from shards_to_records(pa.Table.from_batches([batch])).to_pylist()


def shard_files(path: str) -> list[str]:
    """The shard files of an ingested dataset folder (its `data/` folder), or one file."""
    if path.endswith(".parquet") and not storage.is_dir(path):
        return [path]
    data_dir = storage.join(path, "data") if storage.is_dir(storage.join(path, "data")) else path
    files = [f for f in storage.list_files(data_dir) if f.endswith(".parquet")]
    if not files:
        raise FileNotFoundError(f"{path}: no Parquet shards found")
    return files


def open_parquet(path: str) -> Source:
    files = shard_files(path)
    fs, first = storage.resolve(files[0])
    categories = categories_from_schema(pq.read_schema(first, filesystem=fs))
    units = [Unit(name=f"parquet-{i:05d}", kind="parquet", payload=f) for i, f in enumerate(files)]
    return Source("parquet", path, units, categories=categories)
