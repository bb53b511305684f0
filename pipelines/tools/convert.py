"""`detr convert yolo|voc SOURCE OUT.json`: write a COCO instances JSON (and its errors table).

Every job looks a COCO JSON's images up under the JSON's own folder unless told otherwise (`--images`).
So when the images lie under OUT.json's folder, their `file_name`s are written relative to that folder
and the JSON works as it is; otherwise they stay relative to the images folder, which the jobs must then
be given (`images_folder` and `images_under_json` say which)."""
from __future__ import annotations

import json
import os

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


def images_folder(fmt: str, source: str) -> str:
    """Where the converted file names point: YOLO's ROOT/images, VOC's ROOT/JPEGImages."""
    return storage.join(source, "images" if fmt == "yolo" else "JPEGImages")


def images_under_json(images: str, out_json: str) -> str | None:
    """The images folder relative to OUT.json's folder when it lies inside it ("" for that folder), or None."""
    folder, target = storage.canonical(storage.parent(out_json)), storage.canonical(images)
    if storage.has_scheme(folder) != storage.has_scheme(target):
        return None
    if target == folder:
        return ""
    sep = "/" if storage.has_scheme(folder) else os.sep
    if not target.startswith(folder.rstrip(sep) + sep):
        return None
    return target[len(folder.rstrip(sep)) + 1:].replace(os.sep, "/")


def convert(fmt: str, source: str, out_json: str, classes: str | None = None) -> tuple[dict, list[ErrorRecord]]:
    """Convert and write OUT.json plus OUT.errors.parquet; returns (coco dict, errors)."""
    if fmt == "yolo":
        coco, errors = yolo_to_coco(source, classes)
    elif fmt == "voc":
        names = None if classes is None else [n.strip() for n in storage.read_text(classes).splitlines() if n.strip()]
        coco, errors = voc_to_coco(source, names)
    else:
        raise RaydetrError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    prefix = images_under_json(images_folder(fmt, source), out_json)
    if prefix:
        for image in coco["images"]:
            image["file_name"] = f"{prefix}/{image['file_name']}"
    storage.write_bytes_atomic(out_json, json.dumps(coco).encode())
    write_errors_table(errors, errors_path_for(out_json))
    return coco, errors
