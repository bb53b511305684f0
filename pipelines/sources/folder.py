"""Plain folders and globs of images, without annotations: what labelling jobs read."""
from __future__ import annotations

from pipelines import storage
from pipelines.records import make_record
from pipelines.sources.base import Source, record_units


def open_folder(path: str, rows_per_unit: int = 1000) -> Source:
    """Every image file under a folder (recursively) or matching a glob, in sorted order.

    The key of each image is its path (or URI) as listed, so it is stable across runs.
    """
    files = storage.list_files(path, extensions=storage.IMAGE_EXTENSIONS)
    records = [make_record(f, source=path, path=f) for f in files]
    return Source("folder", path, record_units(records, "folder", rows_per_unit), categories=None)
