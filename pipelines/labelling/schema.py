"""The labelling output's tables: one row per labelled image, and what the model actors return.

`LABEL_SCHEMA` is the committed dataset (OUT/labels/*.parquet). Detections are
list columns, aligned per image and ordered by score (best first): `boxes` as
pixel (x0, y0, x1, y1) in the image as displayed (EXIF orientation applied),
`scores`, `labels` (category ids) and `label_names`. The model columns say
which model made the row; `label_run` which run committed it.

`RESULT_SCHEMA` is what a model actor returns for every input row: the detection
columns, or an error reason for an image that could not be read, plus an
optional PNG preview. The driver splits it into label rows and error rows.
"""
from __future__ import annotations

import pyarrow as pa

IMAGE_FIELDS = [
    pa.field("key", pa.string()),  # stable identity: a path, `archive!member`, or an ingested key
    pa.field("source", pa.string()),  # the folder, archive or dataset it came from
    pa.field("image_id", pa.int64()),
    pa.field("width", pa.int32()),  # as displayed
    pa.field("height", pa.int32()),
    pa.field("content_hash", pa.string()),  # sha256 of the file's bytes
]
DETECTION_FIELDS = [
    pa.field("boxes", pa.list_(pa.list_(pa.float32(), 4))),  # pixel xyxy
    pa.field("scores", pa.list_(pa.float32())),
    pa.field("labels", pa.list_(pa.int64())),
    pa.field("label_names", pa.list_(pa.string())),
]
MODEL_FIELDS = [
    pa.field("model_name", pa.string()),
    pa.field("model_version", pa.string()),
    pa.field("model_run_id", pa.string()),
    pa.field("label_run", pa.string()),
]
LABEL_SCHEMA = pa.schema(IMAGE_FIELDS + DETECTION_FIELDS + MODEL_FIELDS)

RESULT_SCHEMA = pa.schema(IMAGE_FIELDS + DETECTION_FIELDS + [
    pa.field("error_reason", pa.string()),  # "" for a labelled image
    pa.field("error_detail", pa.string()),
    pa.field("preview_png", pa.binary()),  # null unless this image was drawn
])


def model_columns(table: pa.Table, name: str, version: str, run_id: str, label_run: str) -> pa.Table:
    """`table` (RESULT_SCHEMA rows of labelled images) as LABEL_SCHEMA, the model columns filled in."""
    n = table.num_rows
    columns = [table[f.name] for f in IMAGE_FIELDS + DETECTION_FIELDS]
    columns += [pa.array([value] * n, pa.string()) for value in (name, version, run_id, label_run)]
    return pa.Table.from_arrays(columns, schema=LABEL_SCHEMA)
