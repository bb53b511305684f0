"""`detr ingest`: any source -> validated, sharded Parquet with a manifest and an errors table.

Output layout (OUT may be a local folder or a URI):

    OUT/data/<unit>-<part>.parquet   shards (SHARD_SCHEMA; categories in the schema metadata)
    OUT/errors/<unit>.parquet        rejected images and annotations (source, image, reason, detail)
    OUT/_units/<unit>.json           per-unit completion markers (fingerprint, shards, counts)
    OUT/manifest.json                shards, row counts, categories and the run summary

Deterministic: a source always splits into the same units, a unit always yields
the same records in the same order and its shards are named after it, so the
same input gives byte-identical shards. Idempotent and resumable: a unit whose
marker matches its fingerprint is skipped, and files are written under a
temporary name and renamed, so a killed run never leaves half a shard behind.
"""
from __future__ import annotations

import hashlib
import json
import pickle
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.placement import driver_node_args
from pipelines.sources.base import Source, Unit
from pipelines.sources.parquet import shard_schema
from pipelines.sources.units import iter_unit_records
from pipelines.validation.decode import DecodeLimits
from pipelines.validation.errors import ErrorRecord, RunSummary, errors_to_table
from pipelines.validation.loading import load_record, tally

MANIFEST = "manifest.json"
FORMAT = "raydetr-ingest-v1"


@dataclass(frozen=True)
class IngestOptions:
    rows_per_shard: int = 1000
    limits: DecodeLimits = DecodeLimits()


@dataclass
class IngestResult:
    out: str
    manifest: dict
    summary: RunSummary
    skipped_units: int


def _table_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def unit_fingerprint(unit: Unit, options: IngestOptions, categories: list[dict] | None) -> str:
    """Changes when the unit's input or the options that shape its output change."""
    h = hashlib.sha256()
    h.update(json.dumps([FORMAT, asdict(options), categories], sort_keys=True, default=str).encode())
    if unit.kind == "records":
        h.update(pickle.dumps([{k: v for k, v in r.items()} for r in unit.payload], protocol=4))
    else:
        fs, path = storage.resolve(unit.payload)
        info = fs.get_file_info(path)
        h.update(json.dumps([unit.kind, unit.payload, info.size, info.mtime_ns]).encode())
    return h.hexdigest()


def _shard_rows(loaded) -> dict[str, Any]:
    ann = loaded.annotations
    has = ann is not None
    return {
        "image_id": loaded.image_id,
        "key": loaded.key,
        "source": loaded.source,
        "image": loaded.data,
        "width": loaded.image.width,
        "height": loaded.image.height,
        "content_hash": hashlib.sha256(loaded.data).hexdigest(),
        "has_annotations": has,
        "boxes": np.asarray(ann.boxes, np.float32).tolist() if has else [],
        "labels": ann.category_ids.tolist() if has else [],
        "iscrowd": ann.iscrowd.astype(int).tolist() if has else [],
        "area": np.asarray(ann.area, np.float32).tolist() if has else [],
    }


def ingest_unit(unit: Unit, out: str, options: IngestOptions, categories: list[dict] | None) -> dict:
    """Write one unit's shards and errors; returns its marker (also written to OUT/_units)."""
    fingerprint = unit_fingerprint(unit, options, categories)
    marker_path = storage.join(out, "_units", f"{unit.name}.json")
    if storage.exists(marker_path):
        marker = json.loads(storage.read_bytes(marker_path))
        if marker.get("fingerprint") == fingerprint:
            marker["skipped"] = True
            return marker
    known = None if categories is None else {int(c["id"]) for c in categories}
    schema = shard_schema(categories)
    summary, errors, rows, shards = RunSummary(), [], [], []

    def flush() -> None:
        name = f"data/{unit.name}-{len(shards):05d}.parquet"
        storage.write_bytes_atomic(storage.join(out, name), _table_bytes(pa.Table.from_pylist(rows, schema=schema)))
        shards.append({"path": name, "rows": len(rows)})
        rows.clear()

    for record in iter_unit_records(unit):
        loaded, errs = load_record(record, known, options.limits)
        tally(summary, loaded, errs)
        errors += errs
        if loaded is not None:
            rows.append(_shard_rows(loaded))
            if len(rows) >= options.rows_per_shard:
                flush()
    if rows or not shards:
        flush()
    storage.write_bytes_atomic(storage.join(out, "errors", f"{unit.name}.parquet"), _table_bytes(errors_to_table(errors)))
    marker = {"unit": unit.name, "fingerprint": fingerprint, "shards": shards, "summary": summary.to_json()}
    storage.write_bytes_atomic(marker_path, json.dumps(marker, sort_keys=True).encode())
    marker["skipped"] = False
    return marker


def _ingest_units(batch: dict[str, np.ndarray], out: str, options: IngestOptions, categories) -> dict[str, np.ndarray]:
    markers = [ingest_unit(pickle.loads(blob), out, options, categories) for blob in batch["unit"]]
    return {"marker": np.array([json.dumps(m, sort_keys=True) for m in markers], dtype=object)}


def _remove_stale_files(out: str, keep: set[str], folder: str) -> None:
    fs, root = storage.resolve(storage.join(out, folder))
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return
    for info in fs.get_file_info(pafs.FileSelector(root)):
        rel = f"{folder}/{info.base_name}"
        if info.type == pafs.FileType.File and rel not in keep:
            fs.delete_file(info.path)


def ingest(source: Source, out: str, options: IngestOptions = IngestOptions(), concurrency: int | None = None) -> IngestResult:
    """Run the ingest as a Ray Data job (one task per unit); returns the manifest and summary."""
    import ray

    out = storage.absolute(out)  # the tasks' working directory is not the driver's: a relative path went astray
    planning_errors: list[ErrorRecord] = list(source.planning_errors)
    storage.write_bytes_atomic(storage.join(out, "errors", "planning.parquet"), _table_bytes(errors_to_table(planning_errors)))
    units_ds = ray.data.from_items(
        [{"unit": pickle.dumps(u)} for u in source.units], override_num_blocks=max(1, len(source.units))
    )
    # A task that reads local files or writes a local folder runs where they are: on the driver's node.
    first = source.units[0].payload if source.units else None
    first_path = first if isinstance(first, str) else (first[0].get("path") if first else None)
    results = units_ds.map_batches(
        _ingest_units, batch_size=1, concurrency=concurrency,
        fn_kwargs={"out": out, "options": options, "categories": source.categories},
        **driver_node_args(out, source.path, first_path, num_cpus=1),  # decoding: a CPU where there is one
    ).take_all()
    markers = sorted((json.loads(r["marker"]) for r in results), key=lambda m: m["unit"])
    summary = RunSummary()
    for m in markers:
        summary.add(RunSummary.from_json(m["summary"]))
    summary.add(RunSummary.of_planning(planning_errors))
    shards = [s for m in markers for s in m["shards"]]
    keep = {s["path"] for s in shards} | {f"errors/{m['unit']}.parquet" for m in markers} | {"errors/planning.parquet"}
    _remove_stale_files(out, keep, "data")
    _remove_stale_files(out, keep, "errors")
    _remove_stale_files(out, {f"_units/{m['unit']}.json" for m in markers}, "_units")
    manifest = {
        "format": FORMAT,
        "source": {"kind": source.kind, "path": source.path},
        "categories": source.categories,
        "options": asdict(options),
        "shards": shards,
        "rows": sum(s["rows"] for s in shards),
        "errors": "errors/",
        "summary": summary.to_json(),
    }
    storage.write_bytes_atomic(storage.join(out, MANIFEST), json.dumps(manifest, indent=2, sort_keys=True).encode())
    return IngestResult(out, manifest, summary, sum(1 for m in markers if m.get("skipped")))
