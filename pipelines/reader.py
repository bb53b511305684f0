"""Sources as lazy, streaming Ray Datasets of records (RECORD_SCHEMA).

Each unit of a source (a chunk of planned records, an archive, a shard) becomes
one read task whose generator yields small Arrow tables, so an archive of
millions of members streams through in bounded memory. Ingested Parquet shards
are read with `ray.data.read_parquet` and mapped to records column-wise.
"""
from __future__ import annotations

import pickle
from typing import Iterator

import pyarrow as pa

from pipelines.records import records_table
from pipelines.sources.base import Source, iter_unit_records
from pipelines.sources.parquet import shard_files, shards_to_records

ROWS_PER_BLOCK = 16


def _read_units(batch: pa.Table, rows_per_block: int) -> Iterator[pa.Table]:
    for blob in batch["unit"].to_pylist():
        pending: list[dict] = []
        for record in iter_unit_records(pickle.loads(blob)):
            pending.append(record)
            if len(pending) >= rows_per_block:
                yield records_table(pending)
                pending = []
        if pending:
            yield records_table(pending)


def read_source(source: Source, rows_per_block: int = ROWS_PER_BLOCK):
    """The records of `source` as a ray.data.Dataset (lazy; nothing runs until consumed)."""
    import ray

    if source.kind == "parquet":
        files = shard_files(source.path)
        ds = ray.data.read_parquet(files).map_batches(shards_to_records, batch_format="pyarrow")
    elif not source.units:
        return ray.data.from_arrow(records_table([]))
    else:
        units = ray.data.from_items(
            [{"unit": pickle.dumps(u)} for u in source.units], override_num_blocks=len(source.units)
        )
        ds = units.map_batches(
            _read_units, batch_size=1, batch_format="pyarrow", fn_kwargs={"rows_per_block": rows_per_block}
        )
    # Ray merges a task's small outputs into large blocks; small blocks of records are what
    # spreads decoding and augmentation over many parallel tasks (streaming, no shuffle).
    return ds.repartition(target_num_rows_per_block=rows_per_block)
