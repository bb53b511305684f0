"""The panoptic labels as a COCO panoptic JSON: what panopticapi and COCO panoptic tools read.

    {"categories": [{"id", "name", "isthing"}, ...],
     "images": [{"id", "file_name", "width", "height"}, ...],
     "annotations": [{"image_id", "file_name", "segments_info": [{"id", "category_id", "iscrowd",
                                                                   "bbox", "area", "score"}]}, ...]}

The annotations' `file_name` names the segment-id PNG in OUT/panoptic/ (the
folder to pass as the PNG folder); the images' `file_name` is the image's key.
Written from the committed output (every run's rows, each image once), part by
part into an atomic output stream (two passes: images, then annotations), so
memory stays flat however many rows.
"""
from __future__ import annotations

import json
import posixpath
from typing import Any, Iterable, Iterator, Mapping, Sequence

from pipelines import storage
from pipelines.labelling.output import LABELS, LabelOutput


def _write_list(stream: Any, items: Iterable[dict]) -> int:
    count = 0
    for item in items:
        stream.write((",\n" if count else "\n").encode() + json.dumps(item).encode())
        count += 1
    return count


def _images(output: LabelOutput) -> Iterator[dict]:
    for table in output.iter_rows(LABELS, ["image_id", "width", "height"]):
        for row in table.to_pylist():
            yield {"id": int(row["image_id"]), "file_name": row["key"], "width": int(row["width"]),
                   "height": int(row["height"])}


def _annotations(output: LabelOutput) -> Iterator[dict]:
    for table in output.iter_rows(LABELS, ["image_id", "panoptic_file", "segments"]):
        for row in table.to_pylist():
            yield {"image_id": int(row["image_id"]), "file_name": posixpath.basename(row["panoptic_file"]),
                   "segments_info": [{"id": int(s["id"]), "category_id": int(s["category_id"]), "iscrowd": 0,
                                      "bbox": [int(v) for v in s["bbox"]], "area": int(s["area"]),
                                      "score": round(float(s["score"]), 5)} for s in row["segments"]]}


def write_coco_panoptic(output: LabelOutput, path: str, categories: Sequence[Mapping[str, Any]] | None) -> int:
    """Write every committed panoptic row to `path` (local or URI) as COCO panoptic JSON; returns how many
    images. `categories` are the model's (a category without `isthing` is a thing, as in the merge)."""
    cats = [{"id": int(c["id"]), "name": str(c["name"]), "isthing": int(bool(c.get("isthing", 1)))}
            for c in categories or []]
    with storage.open_output_atomic(path) as stream:
        stream.write(b'{"categories": ' + json.dumps(cats).encode() + b',\n"images": [')
        _write_list(stream, _images(output))
        stream.write(b'\n],\n"annotations": [')
        count = _write_list(stream, _annotations(output))
        stream.write(b"\n]}\n")
    return count
