"""The labelling output's tables: one row per labelled image, and what the model actors return.

`LABEL_SCHEMA` is the committed dataset (OUT/labels/*.parquet). Detections are
list columns, aligned per image and ordered by score (best first): `boxes` as
pixel (x0, y0, x1, y1) in the image as displayed (EXIF orientation applied),
`scores`, `labels` (category ids) and `label_names`. The model columns say
which model made the row; `label_run` which run committed it.

`RESULT_SCHEMA` is what a model actor returns for every input row: the detection
columns, or an error reason for an image that could not be read, plus an
optional PNG preview. The driver splits it into label rows and error rows.

`--task panoptic` adds, before the model columns, `segments` (the image's panoptic
segments, `SEGMENT_TYPE`) and `panoptic_file` (its segment-id PNG, relative to the
output folder); its actors return the PNG's bytes in `panoptic_png`, which the
driver writes before the row is committed.
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
SEGMENT_TYPE = pa.struct([
    pa.field("id", pa.int32()),  # the segment's id in the panoptic PNG (R + 256 G + 256^2 B)
    pa.field("category_id", pa.int64()),
    pa.field("label_name", pa.string()),
    pa.field("isthing", pa.bool_()),
    pa.field("area", pa.int64()),  # pixels at the original size
    pa.field("score", pa.float32()),
    pa.field("bbox", pa.list_(pa.int32(), 4)),  # pixel x, y, w, h (COCO)
    pa.field("rle", pa.struct([pa.field("size", pa.list_(pa.int32(), 2)),  # COCO RLE: [height, width]
                               pa.field("counts", pa.string())])),
])
PANOPTIC_FIELDS = [
    pa.field("segments", pa.list_(SEGMENT_TYPE)),
    pa.field("panoptic_file", pa.string()),  # e.g. "panoptic/000001-1.png", relative to the output folder
]
MODEL_FIELDS = [
    pa.field("model_name", pa.string()),
    pa.field("model_version", pa.string()),
    pa.field("model_run_id", pa.string()),
    pa.field("label_run", pa.string()),
]
LABEL_SCHEMA = pa.schema(IMAGE_FIELDS + DETECTION_FIELDS + MODEL_FIELDS)
PANOPTIC_LABEL_SCHEMA = pa.schema(IMAGE_FIELDS + DETECTION_FIELDS + PANOPTIC_FIELDS + MODEL_FIELDS)

RESULT_SCHEMA = pa.schema(IMAGE_FIELDS + DETECTION_FIELDS + [
    pa.field("error_reason", pa.string()),  # "" for a labelled image
    pa.field("error_detail", pa.string()),
    pa.field("preview_png", pa.binary()),  # null unless this image was drawn
    pa.field("explain_pngs", pa.list_(pa.binary())),  # null unless explained: [decoder PNG, encoder PNG]
])
PANOPTIC_RESULT_SCHEMA = pa.schema(list(RESULT_SCHEMA) + [
    pa.field("segments", pa.list_(SEGMENT_TYPE)),
    pa.field("panoptic_png", pa.binary()),  # the segment-id PNG; null for an error row
])


def model_columns(table: pa.Table, name: str, version: str, run_id: str, label_run: str) -> pa.Table:
    """`table` (result rows of labelled images, with `panoptic_file` added for panoptic results) as
    LABEL_SCHEMA or PANOPTIC_LABEL_SCHEMA, the model columns filled in."""
    schema = PANOPTIC_LABEL_SCHEMA if "segments" in table.column_names else LABEL_SCHEMA
    n = table.num_rows
    model_names = {f.name for f in MODEL_FIELDS}
    columns = [table[f.name] for f in schema if f.name not in model_names]
    columns += [pa.array([value] * n, pa.string()) for value in (name, version, run_id, label_run)]
    return pa.Table.from_arrays(columns, schema=schema)
