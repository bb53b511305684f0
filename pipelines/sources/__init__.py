"""Where images come from: one module per format, one `open_source` that recognises them.

| kind      | what it reads                                              |
|-----------|------------------------------------------------------------|
| coco      | a COCO instances JSON plus its image folder                |
| (coco_panoptic) | a COCO panoptic JSON (recognised by content) + PNGs  |
| yolo      | ROOT/images + ROOT/labels (*.txt) + classes.txt/data.yaml  |
| voc       | ROOT/Annotations (*.xml) + ROOT/JPEGImages                 |
| folder    | a folder (recursive) or a glob of images, no annotations   |
| archive   | .tar / .tar.gz / .zip archives of images, streamed         |
| parquet   | shards written by `detr ingest`                            |
"""
from __future__ import annotations

from detr.errors import RaydetrError
from pipelines import storage
from pipelines.sources.archive import is_archive, open_archives
from pipelines.sources.base import Source, Unit
from pipelines.sources.coco import coco_source, open_coco
from pipelines.sources.folder import FolderOfArchives, open_folder
from pipelines.sources.parquet import open_parquet
from pipelines.sources.units import iter_records, iter_unit_records
from pipelines.sources.voc import voc_to_coco
from pipelines.sources.yolo import yolo_to_coco

KINDS = ("coco", "yolo", "voc", "folder", "archive", "parquet")

__all__ = ["KINDS", "FolderOfArchives", "Source", "Unit", "detect_kind", "iter_records", "iter_unit_records",
           "open_source"]


def detect_kind(path: str, *, list_folder: bool = True) -> str:
    """Guess a source's kind from its path and layout (see the table in this module's docstring).

    A folder whose own files are all archives is `archive`, which takes listing the folder's top level (on
    an object store, a request per thousand names: for a flat prefix of images, its whole listing);
    `list_folder=False` skips that and says `folder`, leaving the check to the folder's streamed listing
    (FolderOfArchives)."""
    lower = path.lower()
    if lower.endswith(".json"):
        return "coco"
    if is_archive(lower):  # one archive, or a glob of them (`archive/2026/*.tar`)
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
        if not list_folder:
            return "folder"
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
    masks: str | None = None,
    stream_listing: bool = False,
    allow_outside_paths: bool = False,
) -> Source:
    """Open any supported source. `images` is the image folder of a COCO JSON (default: its
    folder); `classes` a class-names file for YOLO (one per line) or VOC (fixes the id order);
    `masks` the PNG folder of a COCO panoptic JSON (default: the JSON's path without `.json`).

    `stream_listing=True` (labelling): a folder or glob on an object store is not listed here but by
    a task that reads it (pipelines.sources.folder, pipelines.sources.reader.start_listings); local folders are
    listed here as always. When its kind was guessed and it turns out to hold only archives, reading it
    raises FolderOfArchives (or reads as nothing, and `reader.folder_of_archives` says so, when its
    listing was started early): open it again with kind="archive".

    Folder and archive sources key their images by path: the path given is made canonical first
    (`storage.canonical`), so the same file has the same key however its path was typed.

    Images named outside their folder (an annotation's absolute or `..` path, a symbolic link out of a
    local folder) are `unsafe_path` error records unless `allow_outside_paths`."""
    # Relative paths mean this process's working directory, which the tasks that read them do not share.
    path, images, classes, masks = (storage.absolute(p) for p in (path, images, classes, masks))
    streamed = stream_listing and storage.has_scheme(path)
    guessed = kind is None
    kind = kind or detect_kind(path, list_folder=not streamed)
    if kind in ("coco", "coco_panoptic"):
        return open_coco(path, images, rows_per_unit, masks_dir=masks, allow_outside_paths=allow_outside_paths)
    if kind == "yolo":
        coco, errors = yolo_to_coco(path, classes)
        source = coco_source(coco, storage.join(path, "images"), path, rows_per_unit, allow_outside_paths)
        source.kind, source.planning_errors = "yolo", errors + source.planning_errors
        return source
    if kind == "voc":
        names = None if classes is None else [n.strip() for n in storage.read_text(classes).splitlines() if n.strip()]
        coco, errors = voc_to_coco(path, names)
        source = coco_source(coco, storage.join(path, "JPEGImages"), path, rows_per_unit, allow_outside_paths)
        source.kind, source.planning_errors = "voc", errors + source.planning_errors
        return source
    if kind in ("folder", "archive"):
        path = storage.canonical(path)  # their keys are paths: one spelling, whatever was typed
    if kind == "folder":
        return open_folder(path, rows_per_unit, stream=streamed, archives_possible=streamed and guessed,
                           allow_outside_paths=allow_outside_paths)
    if kind == "archive":
        return open_archives(path)
    if kind == "parquet":
        return open_parquet(path)
    raise RaydetrError(f"unknown source kind {kind!r}; choose from {', '.join(KINDS)}")
