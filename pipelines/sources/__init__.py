"""Where images come from: one module per format, one `open_source` that recognises them.

| kind      | what it reads                                              |
|-----------|------------------------------------------------------------|
| coco      | a COCO instances JSON plus its image folder                |
| yolo      | ROOT/images + ROOT/labels (*.txt) + classes.txt/data.yaml  |
| voc       | ROOT/Annotations (*.xml) + ROOT/JPEGImages                 |
| folder    | a folder (recursive) or a glob of images, no annotations   |
| archive   | .tar / .tar.gz / .zip archives of images, streamed         |
| parquet   | shards written by `detr ingest`                            |
"""
from __future__ import annotations

from pipelines import storage
from pipelines.sources.archive import is_archive, open_archives
from pipelines.sources.base import Source, Unit, iter_unit_records
from pipelines.sources.coco import coco_source, open_coco
from pipelines.sources.folder import open_folder
from pipelines.sources.parquet import open_parquet
from pipelines.sources.voc import voc_to_coco
from pipelines.sources.yolo import yolo_to_coco

KINDS = ("coco", "yolo", "voc", "folder", "archive", "parquet")

__all__ = ["KINDS", "Source", "Unit", "detect_kind", "iter_unit_records", "open_source"]


def detect_kind(path: str) -> str:
    """Guess a source's kind from its path and layout (see the table in this module's docstring)."""
    lower = path.lower()
    if lower.endswith(".json"):
        return "coco"
    if is_archive(lower) and not storage.is_glob(path):
        return "archive"
    if lower.endswith(".parquet"):
        return "parquet"
    if not storage.is_glob(path) and storage.is_dir(path):
        if storage.exists(storage.join(path, "manifest.json")) and storage.is_dir(storage.join(path, "data")):
            return "parquet"
        if storage.is_dir(storage.join(path, "labels")) and storage.is_dir(storage.join(path, "images")):
            return "yolo"
        if storage.is_dir(storage.join(path, "Annotations")) and storage.is_dir(storage.join(path, "JPEGImages")):
            return "voc"
        files = storage.list_files(path, recursive=False)
        if files and all(is_archive(f) for f in files):
            return "archive"
    return "folder"


def open_source(
    path: str,
    kind: str | None = None,
    *,
    images: str | None = None,
    classes: str | None = None,
    rows_per_unit: int = 1000,
) -> Source:
    """Open any supported source. `images` is the image folder of a COCO JSON (default: its
    folder); `classes` a class-names file for YOLO (one per line) or VOC (fixes the id order)."""
    kind = kind or detect_kind(path)
    if kind == "coco":
        return open_coco(path, images, rows_per_unit)
    if kind == "yolo":
        coco, errors = yolo_to_coco(path, classes)
        source = coco_source(coco, storage.join(path, "images"), path, rows_per_unit)
        source.kind, source.planning_errors = "yolo", errors + source.planning_errors
        return source
    if kind == "voc":
        names = None if classes is None else [n.strip() for n in storage.read_text(classes).splitlines() if n.strip()]
        coco, errors = voc_to_coco(path, names)
        source = coco_source(coco, storage.join(path, "JPEGImages"), path, rows_per_unit)
        source.kind, source.planning_errors = "voc", errors + source.planning_errors
        return source
    if kind == "folder":
        return open_folder(path, rows_per_unit)
    if kind == "archive":
        return open_archives(path)
    if kind == "parquet":
        return open_parquet(path)
    raise ValueError(f"unknown source kind {kind!r}; choose from {', '.join(KINDS)}")
