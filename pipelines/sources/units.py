"""Reading a source's units into records, without Ray: one reader per kind of unit, named in one table.

A `Source` is plain data (`pipelines.sources.base`); this is how its units become records, for tools,
tests and the Ray read tasks alike (`pipelines.sources.reader` runs these readers in Ray tasks).
"""
from __future__ import annotations

from typing import Callable, Iterator

from detr.errors import RaydetrError
from pipelines.sources.archive import iter_archive
from pipelines.sources.base import LISTING, Source, Unit
from pipelines.sources.folder import iter_listing
from pipelines.sources.parquet import iter_parquet


def _planned(unit: Unit) -> Iterator[dict]:
    yield from unit.payload


UNIT_READERS: dict[str, Callable[[Unit], Iterator[dict]]] = {
    "records": _planned,  # records planned when the source was opened (COCO, YOLO, VOC, a listed folder)
    LISTING: iter_listing,  # a folder listed as it is read
    "archive": iter_archive,
    "parquet": iter_parquet,
}


def iter_unit_records(unit: Unit) -> Iterator[dict]:
    """The records of one unit, in order."""
    reader = UNIT_READERS.get(unit.kind)
    if reader is None:
        raise RaydetrError(f"unknown kind of source unit {unit.kind!r}; known: {sorted(UNIT_READERS)}")
    yield from reader(unit)


def iter_records(source: Source) -> Iterator[dict]:
    """All records of a source, in order."""
    for unit in source.units:
        yield from iter_unit_records(unit)
