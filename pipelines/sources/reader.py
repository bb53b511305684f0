"""Sources as lazy, streaming Ray Datasets of records (RECORD_SCHEMA).

Each unit of a source (an archive, a shard) becomes one read task whose generator
yields small Arrow tables, so an archive of millions of members streams through in
bounded memory; planned records (a listing, a COCO file) are read in one task per
block; a streamed folder (an object store's, listed by a task: `start_listings`) is
split into blocks of paths that become records in the tasks that read them. Ingested
Parquet shards are read with `ray.data.read_parquet` and mapped to records column-wise.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa

from pipelines import storage
from pipelines.placement import is_local, local_uri, on_driver_node
from pipelines.sources.base import LISTING, Source, Unit, record_units
from pipelines.sources.folder import FolderOfArchives, FolderToList, image_record, iter_listed_images
from pipelines.sources.parquet import shard_files, shards_to_records
from pipelines.sources.records import records_table
from pipelines.sources.units import iter_unit_records
from pipelines.validation import errors as E

ROWS_PER_BLOCK = 16
LISTED_PER_TABLE = 1000  # image paths per table a folder's listing task yields


def inline_local_files(record: dict) -> dict:
    """Read a record's local files into it (the image, its panoptic PNG): run on the driver's node, so the
    tasks after it, on any node, need no disk of the driver's."""
    if record["bytes"] is None and not record["error_reason"] and is_local(record["path"]):
        try:
            record["bytes"] = storage.read_bytes(record["path"])
        except (OSError, ValueError) as exc:
            record["error_reason"], record["error_detail"] = E.READ_ERROR, f"{record['path']}: cannot read ({exc})"
    if record.get("panoptic_png") is None and is_local(record.get("panoptic_path")):
        try:
            record["panoptic_png"] = storage.read_bytes(record["panoptic_path"])
        except (OSError, ValueError):
            pass  # left to the loader, which names the PNG in its error row
    return record


def _touches_local_files(source: Source) -> bool:
    """Whether reading the source opens files on the driver's disk (its path, an archive, a record's image)."""
    if is_local(source.path):
        return True
    for unit in source.units[:1]:
        if unit.kind == "records" and unit.payload:
            first = unit.payload[0]
            return is_local(first.get("path")) or is_local(first.get("panoptic_path"))
        if unit.kind == "archive":
            return is_local(unit.payload)
    return False


def _read_units(batch: pa.Table, rows_per_block: int, inline_local: bool = False) -> Iterator[pa.Table]:
    for blob in batch["unit"].to_pylist():
        pending: list[dict] = []
        for record in iter_unit_records(pickle.loads(blob)):
            pending.append(inline_local_files(record) if inline_local else record)
            if len(pending) >= rows_per_block:
                yield records_table(pending)
                pending = []
        if pending:
            yield records_table(pending)


def read_source(source: Source, rows_per_block: int = ROWS_PER_BLOCK,
                listings: dict[str, StartedListing] | None = None):
    """The records of `source` as a ray.data.Dataset (lazy; nothing runs until consumed). `listings`: what
    `start_listings(source)` returned, for a streamed folder whose listing was started early."""
    import ray

    local = _touches_local_files(source)
    if source.kind == "parquet":
        files = [local_uri(f) for f in shard_files(source.path)]  # local://: read on the driver's node,
        read_args = {"ray_remote_args": {"num_cpus": 0}} if local else {}  # which may have no CPU to spare
        ds = ray.data.read_parquet(files, **read_args).map_batches(shards_to_records, batch_format="pyarrow")
    elif not source.units:
        return ray.data.from_arrow(records_table([]))
    elif all(u.kind == "records" for u in source.units):
        # Planned records (folders, COCO, YOLO, VOC) carry paths, not bytes: one short read task per block,
        # which the next map step fuses with (give it batch_size=None, or it bundles that many blocks per
        # task). One long read task per thousand records held a CPU the decoding needed while it trickled
        # its blocks out: on 2 cores the first labelled rows of 2,000 images came after 33 s instead of 8 s.
        records = [r for u in source.units for r in u.payload]
        return _read_unit_blocks(record_units(records, "block", rows_per_block), rows_per_block, local)
    elif source.lists_while_read and not local:
        return _read_listing(source.units, rows_per_block, listings or {})
    else:
        ds = _read_unit_blocks(source.units, rows_per_block, local)
    # An archive's read task yields its members as it streams them and Ray merges a task's small outputs
    # into large blocks; small blocks of records are what spreads decoding and augmentation over many
    # parallel tasks (streaming, no shuffle).
    return ds.repartition(target_num_rows_per_block=rows_per_block)


@dataclass(frozen=True)
class StartedListing:
    """A streamed folder's listing, started early (`start_listings`): references to its images (a table, column
    `image`, sorted) and to whether the folder turned out to hold only archives (FolderOfArchives; no images)."""

    images: Any
    archives_only: Any


def _list_folder(folder: FolderToList) -> tuple[bool, pa.Table]:
    try:
        return False, pa.table({"image": pa.array(list(iter_listed_images(folder)), pa.string())})
    except FolderOfArchives:
        return True, pa.table({"image": pa.array([], pa.string())})


def start_listings(source: Source) -> dict[str, StartedListing]:
    """Start listing each streamed folder of `source` now, in a task of its own that waits on the store (no
    CPU), and return what to pass to `read_source(..., listings=)`: the listing, which on an object store
    takes a request per thousand names, then overlaps whatever the caller does before the dataset runs
    (importing torch, loading a model, scanning its output, starting actors). A folder found to hold only
    archives reads as no records: ask `folder_of_archives` once the dataset ran. {} for other sources."""
    import ray

    if not source.lists_while_read or _touches_local_files(source):
        return {}
    lister = ray.remote(num_cpus=0, num_returns=2)(_list_folder)
    started = {}
    for unit in source.units:
        if unit.kind == LISTING:
            archives_only, images = lister.remote(unit.payload)
            started[unit.name] = StartedListing(images, archives_only)
    return started


def folder_of_archives(listings: dict[str, StartedListing]) -> bool:
    """Whether a listing `start_listings` started found a folder of archives (an `archive` source: what
    detect_kind says when it lists the folder itself); waits for the listings to end."""
    import ray

    return any(ray.get([listing.archives_only for listing in listings.values()]))


def _listed_images(batch: pa.Table, listings: dict[str, StartedListing]) -> Iterator[pa.Table]:
    import ray

    for blob in batch["unit"].to_pylist():
        unit = pickle.loads(blob)
        folder = unit.payload
        if unit.name in listings:
            images = ray.get(listings[unit.name].images)["image"]
            chunks = (images.slice(i, LISTED_PER_TABLE).to_pylist()
                      for i in range(0, len(images), LISTED_PER_TABLE))
        else:
            chunks = _chunks(iter_listed_images(folder), LISTED_PER_TABLE)
        for chunk in chunks:
            yield pa.table({"image": chunk, "folder": [folder.path] * len(chunk)})


def _chunks(items: Iterator[str], size: int) -> Iterator[list[str]]:
    pending: list[str] = []
    for item in items:
        pending.append(item)
        if len(pending) >= size:
            yield pending
            pending = []
    if pending:
        yield pending


def _image_records(batch: pa.Table) -> pa.Table:
    folders, images = batch["folder"].to_pylist(), batch["image"].to_pylist()
    return records_table([image_record(folder, image) for folder, image in zip(folders, images)])


def _read_listing(units: list[Unit], rows_per_block: int, listings: dict[str, StartedListing]):
    """Streamed folders on object stores (pipelines.sources.folder): a read task per folder takes the listing
    `start_listings` started, or lists the folder itself (it waits on the store, so it reserves no CPU), and
    yields the paths of its images; Ray merges them into blocks of up to DataContext.target_max_block_size (a
    whole listing of a few hundred thousand paths), which a streaming repartition splits into blocks of
    `rows_per_block`, each turned into records by the task that reads it (fused with the next step). Paths,
    not records, go through the split: on 2 cores, splitting 100,000 records (nested list columns) into 3,125
    blocks took 70 s, their paths 6 s.

    Neither task waits for its output to be consumed before it ends: held back (Ray Data's default
    streaming-generator buffer), the splitting task keeps its CPU while it trickles blocks out, the CPU that
    decoding them needs on a small cluster (2 cores: the first labelled rows waited for the whole run). So
    the driver holds a reference to every block of paths at once (about 0.3 KB an image, 30 MB for 100,000);
    the steps after them return one block per task or batch, which the setting leaves as it was."""
    import ray

    items = ray.data.from_items([{"unit": pickle.dumps(u)} for u in units], override_num_blocks=len(units))
    listed = items.map_batches(_listed_images, batch_size=1, batch_format="pyarrow", num_cpus=0,
                               fn_kwargs={"listings": listings})
    listed.context._max_num_blocks_in_streaming_gen_buffer = None
    return listed.repartition(target_num_rows_per_block=rows_per_block).map_batches(
        _image_records, batch_size=None, batch_format="pyarrow")


LOCAL_READ_TASKS = 4
"""Read tasks at once on the driver's node for local files. They reserve no CPU (pipelines.placement), so
nothing else bounds them: a folder of 1,000 images (125 units) started 122 Ray worker processes at once on
2 cores, whose start-up took the CPU for the first 100 s of the job (no row before), and each holds memory."""


def _read_unit_blocks(units: list[Unit], rows_per_block: int, local: bool = False):
    """One read task per unit, yielding blocks of at most `rows_per_block` records. Units that open local
    files are read on the driver's node, their bytes inlined (pipelines.placement), `LOCAL_READ_TASKS` at once."""
    import ray

    items = ray.data.from_items([{"unit": pickle.dumps(u)} for u in units], override_num_blocks=len(units))
    placement = {}
    if local:
        readers = ray.data.TaskPoolStrategy(size=max(1, min(LOCAL_READ_TASKS, len(units))))
        placement = {"compute": readers, **on_driver_node()}
    return items.map_batches(_read_units, batch_size=1, batch_format="pyarrow",
                             fn_kwargs={"rows_per_block": rows_per_block, "inline_local": local}, **placement)
