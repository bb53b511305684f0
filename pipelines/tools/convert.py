"""`detr convert yolo|voc SOURCE OUT.json`: write a COCO instances JSON (and its errors table)."""
from __future__ import annotations

import json

from detr.errors import RaydetrError
from pipelines import storage
from pipelines.sources.voc import voc_to_coco
from pipelines.sources.yolo import yolo_to_coco
from pipelines.validation.errors import ErrorRecord, write_errors_table

FORMATS = ("yolo", "voc")


def errors_path_for(out_json: str) -> str:
    """The errors table beside OUT.json: OUT.errors.parquet."""
    base = out_json[: -len(".json")] if out_json.endswith(".json") else out_json
    return f"{base}.errors.parquet"


def convert(fmt: str, source: str, out_json: str, classes: str | None = None) -> tuple[dict, list[ErrorRecord]]:
    """Convert and write OUT.json plus OUT.errors.parquet; returns (coco dict, errors)."""
    if fmt == "yolo":
        coco, errors = yolo_to_coco(source, classes)
    elif fmt == "voc":
        names = None if classes is None else [n.strip() for n in storage.read_text(classes).splitlines() if n.strip()]
        coco, errors = voc_to_coco(source, names)
    else:
        raise RaydetrError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    storage.write_bytes_atomic(out_json, json.dumps(coco).encode())
    write_errors_table(errors, errors_path_for(out_json))
    return coco, errors
