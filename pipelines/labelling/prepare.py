"""Ray Data task: records -> images ready for the model, in shape order, minus those already labelled.

Everything here runs in parallel Ray tasks, ahead of the model actors, so that the
actors only run the model: rows whose key is already committed are dropped
before any bytes are decoded (resumption; a dropped row whose bytes came with it, an
archive member or an ingested image, is hashed first: other bytes than those labelled
under its key become a `changed_since_labelled` error row of its own, not a silent
skip), the rest are decoded
(`pipelines.validation.loading.decode_batch`: EXIF orientation, RGB, bomb limits; bad files
keep their row with an error reason), hashed, and resized to the model's input
size as uint8 (a quarter of float32's bytes through the object store). The window
of images a task sees leaves it sorted by input shape, so the actors' batches
carry little padding.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import torch

from pipelines.inference.detector import EvalPreprocessing
from pipelines.labelling.key_digests import contains_sorted, content_digests, key_digests
from pipelines.labelling.shapes import shape_order
from pipelines.training.transforms import TransformsConfig
from pipelines.validation.decode import DecodeLimits
from pipelines.validation.errors import CHANGED_SINCE_LABELLED
from pipelines.validation.loading import decode_batch

PREPARED_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("source", pa.string()),
    ("image_id", pa.int64()),
    ("width", pa.int32()),  # the decoded image, as displayed
    ("height", pa.int32()),
    ("content_hash", pa.string()),
    ("pixels", pa.large_binary()),  # uint8 [3, input_height, input_width], C order; empty for errors
    ("input_height", pa.int32()),
    ("input_width", pa.int32()),
    ("error_reason", pa.string()),
    ("error_detail", pa.string()),
])
_RECORD_COLUMNS = ("key", "source", "image_id", "path", "bytes", "error_reason", "error_detail")
DECODE_SLICE = 8  # images decoded at full size at a time, before resizing


def pixels_array(row_bytes: bytes, height: int, width: int) -> np.ndarray:
    """A `pixels` cell back as uint8 [3, height, width] (read-only view)."""
    return np.frombuffer(row_bytes, dtype=np.uint8).reshape(3, height, width)


def _report_changed(skipped: pa.Table, labelled: np.ndarray, contents: np.ndarray, columns: dict) -> None:
    """Error rows for skipped records whose inline bytes differ from what was labelled under their key."""
    rows = [(k, s, i, b) for k, s, i, b in zip(*(skipped[n].to_pylist() for n in ("key", "source", "image_id", "bytes")))
            if b is not None]
    if not rows:
        return
    keys = [r[0] for r in rows]
    hashes = [hashlib.sha256(r[3]).hexdigest() for r in rows]
    changed = contains_sorted(labelled, key_digests(keys)) & ~contains_sorted(contents, content_digests(keys, hashes))
    for (key, source, image_id, _), digest in ((r, h) for r, h, c in zip(rows, hashes, changed) if c):
        values = {"key": f"{key}#sha256={digest[:16]}", "source": source, "image_id": image_id, "width": 0,
                  "height": 0, "content_hash": digest, "pixels": b"", "input_height": 0, "input_width": 0,
                  "error_reason": CHANGED_SINCE_LABELLED,
                  "error_detail": f"{key}: other bytes (sha256 {digest[:16]}...) than those labelled under this key; "
                                  "label the new version into another --output"}
        for name, value in values.items():
            columns[name].append(value)


def prepare_batch(records: pa.Table, *, done: np.ndarray, transforms: TransformsConfig,
                  limits: DecodeLimits = DecodeLimits(), labelled: np.ndarray | None = None,
                  contents: np.ndarray | None = None) -> pa.Table:
    """A block of records (RECORD_SCHEMA) -> PREPARED_SCHEMA rows, sorted by input shape.

    `done` holds the sorted digests of keys already committed (see `key_digests`); `labelled` those with a
    label row and `contents` the digests of their (key, content hash) pairs (`content_digests`).
    """
    torch.set_num_threads(1)  # one Ray CPU per task
    columns: dict[str, list] = {name: [] for name in PREPARED_SCHEMA.names}
    keys = records["key"].to_pylist()
    todo = ~contains_sorted(done, key_digests(keys))
    if not todo.all():
        if labelled is not None and contents is not None:
            _report_changed(records.filter(pa.array(~todo)), labelled, contents, columns)
        records = records.filter(pa.array(todo))
    preprocessing = EvalPreprocessing(transforms)
    for start in range(0, records.num_rows, DECODE_SLICE):
        rows = records.slice(start, DECODE_SLICE)  # decode a few at a time: full-size images are large
        batch = {name: rows[name].to_numpy(zero_copy_only=False) for name in _RECORD_COLUMNS if name in rows.column_names}
        decoded = decode_batch(batch, limits)
        for name in ("key", "source", "image_id", "width", "height", "content_hash", "error_reason", "error_detail"):
            columns[name] += decoded[name].tolist()
        for image, reason in zip(decoded["image"], decoded["error_reason"]):
            resized = np.zeros((3, 0, 0), np.uint8) if reason else preprocessing.resize(image).numpy()
            columns["pixels"].append(np.ascontiguousarray(resized).tobytes())
            columns["input_height"].append(resized.shape[1])
            columns["input_width"].append(resized.shape[2])
    order = shape_order(list(zip(columns["input_height"], columns["input_width"])))
    return pa.Table.from_arrays(
        [pa.array([columns[f.name][i] for i in order], f.type) for f in PREPARED_SCHEMA], schema=PREPARED_SCHEMA)
