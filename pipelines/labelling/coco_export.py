"""The labels as a COCO results file: what pycocotools' `loadRes` and most COCO tools read.

    [{"image_id": 42, "category_id": 3, "bbox": [x, y, w, h], "score": 0.97}, ...]

Written from the committed output (every run's rows, each image once), part by
part into an atomic output stream, so memory stays flat however many rows.
"""
from __future__ import annotations

import json

import numpy as np

from pipelines import storage
from pipelines.labelling.output import LABELS, LabelOutput


def write_coco_results(output: LabelOutput, path: str) -> int:
    """Write every committed detection to `path` (local or URI) as COCO results; returns how many."""
    count = 0
    with storage.open_output_atomic(path) as stream:
        stream.write(b"[")
        for table in output.iter_rows(LABELS, ["image_id", "boxes", "scores", "labels"]):
            for row in table.to_pylist():
                boxes = np.asarray(row["boxes"], dtype=np.float64).reshape(-1, 4)
                xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).round(3)
                for box, score, label in zip(xywh.tolist(), row["scores"], row["labels"]):
                    item = {"image_id": int(row["image_id"]), "category_id": int(label), "bbox": box,
                            "score": round(float(score), 5)}
                    stream.write((",\n" if count else "\n").encode() + json.dumps(item).encode())
                    count += 1
        stream.write(b"\n]\n")
    return count
