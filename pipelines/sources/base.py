"""What every source offers: categories, deterministic work units, and records.

A source is split into *units* of work, each a small, picklable description
(a chunk of planned records, one archive, one Parquet file). Units are the
grain of parallelism for Ray Data readers and the grain of determinism and
resumption for `detr ingest`: the same input always gives the same units in the
same order, and each unit always yields the same records in the same order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipelines.validation.errors import ErrorRecord

LISTING = "listing"  # the kind of a streamed folder's unit: listed by whoever reads it (pipelines.sources.folder)


@dataclass(frozen=True)
class Unit:
    """A piece of a source: `name` is stable (used in shard names), `payload` says what to read."""

    name: str
    kind: str  # "records", "archive", "parquet" or "listing" (a folder listed as it is read)
    payload: Any
    size_hint: int = 0  # number of records when known


@dataclass
class Source:
    """A readable collection of images, optionally with annotations and a category table."""

    kind: str
    path: str
    units: list[Unit]
    categories: list[dict] | None = None  # COCO categories; None for unlabelled sources
    planning_errors: list[ErrorRecord] = field(default_factory=list)

    @property
    def is_panoptic(self) -> bool:
        """A COCO panoptic source: records carry segment PNGs, samples carry masks."""
        return self.kind == "coco_panoptic"

    @property
    def lists_while_read(self) -> bool:
        """A streamed folder: its records come from a listing made by whoever reads it."""
        return any(u.kind == LISTING for u in self.units)

    @property
    def category_ids(self) -> set[int] | None:
        return None if self.categories is None else {int(c["id"]) for c in self.categories}


def record_units(records: list[dict], prefix: str, rows_per_unit: int) -> list[Unit]:
    """Chunks of planned records as units named `{prefix}-00000`, `{prefix}-00001`, ..."""
    return [
        Unit(name=f"{prefix}-{i // rows_per_unit:05d}", kind="records",
             payload=records[i: i + rows_per_unit], size_hint=len(records[i: i + rows_per_unit]))
        for i in range(0, len(records), rows_per_unit)
    ]
