"""The labelling output folder: committed chunks are the truth, each image in exactly one of them.

    OUT/labels/part-000000.parquet   label rows (schema.LABEL_SCHEMA), one per labelled image
    OUT/errors/part-000000.parquet   images that could not be read (source, image, reason, detail)
    OUT/previews/*.png               drawn detections for the first N images (--draw N)
    OUT/explain/*_decoder.png,       the decoder's attention of each detection and the encoder's at their
               *_encoder.png         centres, for the first N images (--explain N)
    OUT/panoptic/*.png               --task panoptic: each labelled image's segment ids (COCO panoptic PNG)
    OUT/manifest.json                model and settings (written once, by the first run)
    OUT/runs/<run>.json              each run: when, what input, what it added, the output's totals after it

A chunk is committed by writing it under a hidden temporary name and renaming it
(`storage.write_bytes_atomic`), so a killed job leaves either a whole part or a
hidden temporary file that readers skip and a later run deletes (once it is older
than `STALE_TEMPORARY_SECONDS`: a younger one may be a concurrent run's write). A panoptic
PNG is written (atomically too) before the part holding its row is committed,
so every committed row's PNG exists; a PNG whose row a killed run never
committed is written again, whole, when the image is labelled again. Part numbers
grow by one per commit (labels and errors of one commit share it), so file
order is commit order.

Several runs may write one output at once (two `detr label` into the same
folder, on a local disk or an object store, where renames are not atomic and
there is no lock): nothing one run writes can replace what another wrote. Part
names carry the writing run's id (`part-000007-<run>.parquet`), each run records
itself in a file of its own under `runs/`, and the manifest is only ever
created, never rewritten. A run never commits a key twice; two runs started
together may both label an image, and readers keep the first committed row of
each key (`iter_rows`, with parts in (number, name) order), so every image is
counted once and `scan` counts what it ignored.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.labelling.key_digests import KeyDigestSet, content_digests, key_digests
from pipelines.labelling.schema import LABEL_SCHEMA
from pipelines.validation.errors import errors_schema

LABELS = "labels"
ERRORS = "errors"
PREVIEWS = "previews"
EXPLAIN = "explain"
PANOPTIC = "panoptic"
RUNS = "runs"
MANIFEST = "manifest.json"
FORMAT = "raydetr-labels-v1"
KEY_COLUMN = {LABELS: "key", ERRORS: "image"}  # the errors table names the image in `image`
_PART = re.compile(r"^part-(\d+)(?:-([0-9A-Za-z]+))?\.parquet$")
STALE_TEMPORARY_SECONDS = 600.0
"""A hidden temporary file older than this is a killed run's (a write takes seconds): a later run deletes it."""


def part_name(number: int, writer: str = "") -> str:
    """A part's file name; `writer` (the committing run's id) keeps concurrent runs' parts apart."""
    return f"part-{number:06d}{'-' + writer if writer else ''}.parquet"


def image_file_name(key: str, image_id: int, suffix: str = ".png") -> str:
    """A file name for an image's preview or panoptic PNG: its base name made safe, plus its id (unique)."""
    base = re.split(r"[/!\\]", key)[-1].rsplit(".", 1)[0]
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '_', base)[:80]}-{image_id}{suffix}"


def _table_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


@dataclass
class Committed:
    """What an output folder holds: the keys done (labels and errors) and the totals."""

    keys: KeyDigestSet = field(default_factory=KeyDigestSet)
    labelled_keys: KeyDigestSet = field(default_factory=KeyDigestSet)  # the keys with a label row
    contents: KeyDigestSet = field(default_factory=KeyDigestSet)  # (key, content hash) of each label row
    labelled: int = 0
    errors: int = 0
    detections: int = 0
    duplicates_ignored: int = 0
    next_part: int = 0
    parts: int = 0  # commits (a commit's labels and errors share a part name)
    previews: int = 0
    explained: int = 0  # images with attention pictures in OUT/explain


class LabelOutput:
    """An output folder or URI (see the module docstring for the layout)."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")
        self.fs, self.path = storage.resolve(self.root)

    def _dir(self, kind: str) -> str:
        return f"{self.path}/{kind}"

    def _list(self, kind: str) -> list[pafs.FileInfo]:
        selector = pafs.FileSelector(self._dir(kind), allow_not_found=True)
        return [i for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.File]

    def parts(self, kind: str) -> list[tuple[int, str]]:
        """Committed parts of `kind` (LABELS or ERRORS) as (number, path inside the file system), in commit
        order (parts of concurrent runs with one number: by name)."""
        found = [(int(m.group(1)), info.path) for info in self._list(kind) if (m := _PART.match(info.base_name))]
        return sorted(found)

    def remove_temporaries(self, older_than: float = STALE_TEMPORARY_SECONDS) -> int:
        """Delete the hidden temporary files killed runs left behind (those older than `older_than` seconds:
        a younger one may be a concurrent run's write in progress); returns how many."""
        now = time.time()
        stale = [info.path for kind in (LABELS, ERRORS, PREVIEWS, PANOPTIC, RUNS) for info in self._list(kind)
                 if info.base_name.startswith(".") and storage.TEMPORARY_MARK in info.base_name
                 and info.mtime is not None and now - info.mtime.timestamp() >= older_than]
        for path in stale:
            self.fs.delete_file(path)
        return len(stale)

    def _label_keys(self) -> KeyDigestSet:
        keys = KeyDigestSet()
        for _, path in self.parts(LABELS):
            keys.add_new(key_digests(pq.read_table(path, columns=["key"], filesystem=self.fs)["key"].to_pylist()))
        return keys

    def iter_rows(self, kind: str, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """The committed rows of `kind`, part by part: the first committed row of each key only, and
        no error row for a key that has a label row (labels win, as in `scan`)."""
        key = KEY_COLUMN[kind]
        seen = self._label_keys() if kind == ERRORS else KeyDigestSet()
        for _, path in self.parts(kind):
            wanted = None if columns is None else list(dict.fromkeys([key, *columns]))
            table = pq.read_table(path, columns=wanted, filesystem=self.fs)
            first = seen.add_new(key_digests(table[key].to_pylist()))
            yield table if first.all() else table.filter(pa.array(first))

    def read(self, kind: str, columns: list[str] | None = None) -> pa.Table:
        """All committed rows of `kind` (deduplicated by key, see `iter_rows`)."""
        tables = list(self.iter_rows(kind, columns))
        if tables:
            return pa.concat_tables(tables)
        schema = LABEL_SCHEMA if kind == LABELS else errors_schema()
        return schema.empty_table() if columns is None else schema.empty_table().select(
            list(dict.fromkeys([KEY_COLUMN[kind], *columns])))

    def scan(self) -> Committed:
        """Keys and totals of everything committed (one pass over the key columns)."""
        done = Committed()
        commits = set()
        for kind in (LABELS, ERRORS):
            key = KEY_COLUMN[kind]
            for number, path in self.parts(kind):
                done.next_part = max(done.next_part, number + 1)
                commits.add(path.rsplit("/", 1)[-1])
                columns = [key, "labels", "content_hash"] if kind == LABELS else [key]
                table = pq.read_table(path, columns=columns, filesystem=self.fs)
                keys = table[key].to_pylist()
                digests = key_digests(keys)
                new = done.keys.add_new(digests)
                if kind == LABELS:
                    done.labelled_keys.add_new(digests)
                    done.contents.add_new(content_digests(keys, table["content_hash"].to_pylist()))
                done.duplicates_ignored += int((~new).sum())
                if kind == LABELS:
                    done.labelled += int(new.sum())
                    lengths = pc.list_value_length(table["labels"]).to_numpy(zero_copy_only=False)
                    done.detections += int(lengths[new].sum())
                else:
                    done.errors += int(new.sum())
        done.parts = len(commits)
        done.previews = sum(1 for info in self._list(PREVIEWS) if info.base_name.endswith(".png"))
        done.explained = sum(1 for info in self._list(EXPLAIN) if info.base_name.endswith("_decoder.png"))
        return done

    def commit(self, number: int, labels: pa.Table | None, errors: pa.Table | None, writer: str = "") -> None:
        """Write one commit's label rows and error rows as part `number` of run `writer` (each file atomically)."""
        for kind, table in ((LABELS, labels), (ERRORS, errors)):
            if table is not None and table.num_rows:
                storage.write_bytes_atomic(f"{self.root}/{kind}/{part_name(number, writer)}", _table_bytes(table))

    def ensure_errors_part(self, number: int, writer: str) -> None:
        """An output with no error yet gets an empty errors part, so that OUT/errors/ is a table readers open
        (`pq.read_table`) whatever happened, on a disk or an object store (which has no empty folders)."""
        if not self.parts(ERRORS):
            storage.write_bytes_atomic(f"{self.root}/{ERRORS}/{part_name(number, writer)}",
                                       _table_bytes(errors_schema().empty_table()))

    def write_preview(self, name: str, png: bytes) -> None:
        storage.write_bytes_atomic(f"{self.root}/{PREVIEWS}/{name}", png)

    def write_explanation(self, name: str, decoder_png: bytes, encoder_png: bytes) -> None:
        """An image's attention pictures: NAME_decoder.png (written last: it is what counts as explained)."""
        stem = name.removesuffix(".png")
        storage.write_bytes_atomic(f"{self.root}/{EXPLAIN}/{stem}_encoder.png", encoder_png)
        storage.write_bytes_atomic(f"{self.root}/{EXPLAIN}/{stem}_decoder.png", decoder_png)

    def write_panoptic(self, name: str, png: bytes) -> str:
        """Write a panoptic PNG (replacing one a killed run left); returns its path relative to the root."""
        relative = f"{PANOPTIC}/{name}"
        storage.write_bytes_atomic(f"{self.root}/{relative}", png)
        return relative

    def read_manifest(self) -> dict | None:
        """The manifest with every run: the model and settings, `runs` in the order they started (runs from
        before run files existed first), `status` and `totals` as the latest run to finish left them."""
        base = self.read_base_manifest()
        if base is None:
            return None
        runs = list(base.get("runs", []))  # outputs written before runs had files of their own
        runs += sorted(self._read_runs(), key=lambda r: (r.get("started", ""), r.get("label_run", "")))
        finished = [r for r in runs if r.get("status") == "complete" and "totals" in r]
        latest = max(finished, key=lambda r: (r.get("finished_unix", 0.0), r.get("finished", ""))) if finished else None
        return {**base, "runs": runs, "status": runs[-1]["status"] if runs else base.get("status", "running"),
                "totals": latest["totals"] if latest else base.get("totals", {})}

    def read_base_manifest(self) -> dict | None:
        path = f"{self.root}/{MANIFEST}"
        return json.loads(storage.read_bytes(path)) if storage.exists(path) else None

    def create_manifest(self, manifest: dict) -> bool:
        """Write the manifest unless there is one; True when this call wrote it (see `storage.create_new`)."""
        return storage.create_new(f"{self.root}/{MANIFEST}",
                                  json.dumps(manifest, indent=2, sort_keys=True).encode())

    def write_run(self, run: dict) -> None:
        """Record one run in a file of its own: runs writing at once never overwrite each other's record."""
        storage.write_bytes_atomic(f"{self.root}/{RUNS}/{run['label_run']}.json",
                                   json.dumps(run, indent=2, sort_keys=True).encode())

    def _read_runs(self) -> list[dict]:
        return [json.loads(storage.read_bytes(storage.join(self.root, RUNS, info.base_name)))
                for info in self._list(RUNS) if info.base_name.endswith(".json") and not info.base_name.startswith(".")]
