"""Driver side of the labelling job: buffer the actors' results and commit them, each key once.

Results stream into the driver as small Arrow tables. The writer drops any row
whose key is already committed or already buffered (one `KeyDigestSet` holds
both, seeded from the output's committed parts), splits the rest into label rows
and error rows, saves previews and (panoptic task) each row's segment-id PNG at
once, before the row can be committed, and commits a part when `rows_per_file` rows are
buffered or `commit_seconds` have passed, so a killed job loses at most that much
work and never leaves a key in two parts.
"""
from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.labelling.key_digests import key_digests
from pipelines.labelling.output import Committed, LabelOutput, image_file_name
from pipelines.labelling.schema import model_columns
from pipelines.validation.errors import ErrorRecord, errors_to_table

PNG_WRITE_THREADS = 8  # panoptic PNGs are written in parallel: an object store takes a request per file


@dataclass(frozen=True)
class ModelIdentity:
    """Which model made the rows: the registry's name, version and run id (empty when not registered)."""

    name: str
    version: str = ""
    run_id: str = ""


@dataclass
class RunCounts:
    """What one run added to the output."""

    labelled: int = 0
    errors: int = 0
    detections: int = 0
    segments: int = 0  # panoptic task
    duplicates_dropped: int = 0
    previews: int = 0
    explained: int = 0
    parts: int = 0
    rejected: Counter = field(default_factory=Counter)


class ChunkWriter:
    """Buffers result rows and commits them as numbered parts of `output`; never commits a key twice."""

    def __init__(self, output: LabelOutput, committed: Committed, model: ModelIdentity, label_run: str, *,
                 rows_per_file: int, commit_seconds: float, draw: int, explain: int = 0) -> None:
        self.output, self.model, self.label_run = output, model, label_run
        self.keys = committed.keys
        self.next_part = committed.next_part
        self.previews_left = max(0, draw - committed.previews)
        self.explain_left = max(0, explain - committed.explained)
        self.rows_per_file, self.commit_seconds = rows_per_file, commit_seconds
        self.counts = RunCounts()
        self._labels: list[pa.Table] = []
        self._errors: list[pa.Table] = []
        self._buffered = 0
        self._last_commit = time.monotonic()

    @property
    def part_suffix(self) -> str:
        """What this run's part names carry (`output.part_name`): the run's id, in the characters part names allow."""
        return self.label_run.replace("-", "")

    def _only_new(self, table: pa.Table, key: str) -> pa.Table:
        new = self.keys.add_new(key_digests(table[key].to_pylist()))
        self.counts.duplicates_dropped += int((~new).sum())
        return table if new.all() else table.filter(pa.array(new))

    def add(self, results: pa.Table) -> None:
        """Buffer a table of actor results (schema.RESULT_SCHEMA or PANOPTIC_RESULT_SCHEMA); commits when a
        part is full or due."""
        results = self._only_new(results, "key")
        failed = pc.not_equal(results["error_reason"], "")
        labelled = results.filter(pc.invert(failed))
        self._save_previews(labelled)
        self._save_explanations(labelled)
        if "panoptic_png" in labelled.column_names:
            labelled = self._write_panoptic(labelled)
        if labelled.num_rows:
            self._labels.append(model_columns(labelled, self.model.name, self.model.version, self.model.run_id,
                                              self.label_run))
            self.counts.labelled += labelled.num_rows
            self.counts.detections += int(pc.sum(pc.list_value_length(labelled["labels"])).as_py() or 0)
        errors = results.filter(failed)
        if errors.num_rows:
            self._add_errors(pa.table({"source": errors["source"], "image": errors["key"],
                                       "reason": errors["error_reason"], "detail": errors["error_detail"]}))
        self._buffered += results.num_rows
        if self._buffered >= self.rows_per_file or (
                self._buffered and time.monotonic() - self._last_commit >= self.commit_seconds):
            self.flush()

    def _write_panoptic(self, labelled: pa.Table) -> pa.Table:
        """Write each row's panoptic PNG; returns the rows with its path (`panoptic_file`) instead of its bytes."""
        rows = labelled.select(["key", "image_id", "panoptic_png"]).to_pylist()
        with ThreadPoolExecutor(min(PNG_WRITE_THREADS, max(1, len(rows)))) as pool:
            files = list(pool.map(lambda row: self.output.write_panoptic(
                image_file_name(row["key"], row["image_id"]), row["panoptic_png"]), rows))
        self.counts.segments += int(pc.sum(pc.list_value_length(labelled["segments"])).as_py() or 0)
        return labelled.drop_columns(["panoptic_png"]).append_column("panoptic_file", pa.array(files, pa.string()))

    def add_errors(self, records: Iterable[ErrorRecord]) -> None:
        """Buffer errors found before any image was read (a source's planning errors)."""
        table = self._only_new(errors_to_table(records), "image")
        if table.num_rows:
            self._add_errors(table)
            self._buffered += table.num_rows

    def _add_errors(self, table: pa.Table) -> None:
        self._errors.append(errors_to_table(table.to_pylist()))
        self.counts.errors += table.num_rows
        self.counts.rejected.update(table["reason"].to_pylist())

    def _save_previews(self, labelled: pa.Table) -> None:
        if self.previews_left <= 0:
            return
        drawn = labelled.filter(pc.is_valid(labelled["preview_png"])).slice(0, self.previews_left)
        for row in drawn.select(["key", "image_id", "preview_png"]).to_pylist():
            self.output.write_preview(image_file_name(row["key"], row["image_id"]), row["preview_png"])
        self.previews_left -= drawn.num_rows
        self.counts.previews += drawn.num_rows

    def _save_explanations(self, labelled: pa.Table) -> None:
        if self.explain_left <= 0:
            return
        explained = labelled.filter(pc.is_valid(labelled["explain_pngs"])).slice(0, self.explain_left)
        for row in explained.select(["key", "image_id", "explain_pngs"]).to_pylist():
            self.output.write_explanation(image_file_name(row["key"], row["image_id"]), *row["explain_pngs"])
        self.explain_left -= explained.num_rows
        self.counts.explained += explained.num_rows

    def flush(self) -> None:
        """Commit everything buffered as the next part."""
        if self._buffered:
            labels = pa.concat_tables(self._labels) if self._labels else None
            errors = pa.concat_tables(self._errors) if self._errors else None
            self.output.commit(self.next_part, labels, errors, writer=self.part_suffix)
            self.next_part += 1
            self.counts.parts += 1
        self._labels, self._errors, self._buffered = [], [], 0
        self._last_commit = time.monotonic()
