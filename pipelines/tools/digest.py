"""A dataset's identity: a digest of its contents (image bytes and annotations), not of its path.

Two evaluations whose datasets have the same digest saw the same images with the
same annotations, so their metrics are comparable and a stored evaluation can be
reused. Each record contributes a fingerprint of its key, the BLAKE2b hash of its
bytes and its annotations (category ids, crowd flags and boxes rounded to 1/1000
pixel); fingerprints are sorted by key before they are combined, so the digest
does not depend on how the work was split across Ray tasks. Records a reader
already rejected contribute their key and reason. Hashing reads every byte but
decodes nothing, so it costs a fraction of an evaluation pass.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np

from pipelines.sources import Source, iter_records, open_source
from pipelines.sources.reader import read_source
from pipelines.validation.loading import read_record_bytes

DIGEST_VERSION = "raydetr-dataset-digest-v1"


def record_fingerprint(record: Mapping[str, Any]) -> tuple[str, str]:
    """(key, fingerprint) of one record; unreadable bytes are part of the identity too."""
    key = str(record.get("key", ""))
    h = hashlib.blake2b(digest_size=16)
    if record.get("error_reason"):
        h.update(f"error:{record['error_reason']}".encode())
    else:
        try:
            h.update(hashlib.blake2b(read_record_bytes(record), digest_size=16).digest())
        except Exception as exc:  # noqa: BLE001 - an unreadable file is part of what the dataset is
            h.update(f"unreadable:{type(exc).__name__}".encode())
    if record.get("has_annotations"):
        boxes = np.round(np.asarray(record.get("boxes") or [], dtype=np.float64).reshape(-1, 4), 3).tolist()
        annotations = {"boxes": boxes, "category_ids": [int(c) for c in record.get("category_ids") or []],
                       "iscrowd": [int(c) for c in record.get("iscrowd") or []]}
        h.update(json.dumps(annotations, sort_keys=True).encode())
    return key, h.hexdigest()


def _fingerprint_batch(batch) -> dict[str, list]:
    rows = [record_fingerprint(record) for record in batch.to_pylist()]
    return {"key": [k for k, _ in rows], "fingerprint": [f for _, f in rows]}


def combine_fingerprints(fingerprints: Iterable[tuple[str, str]], categories: list[dict] | None) -> str:
    h = hashlib.blake2b(digest_size=20)
    h.update(DIGEST_VERSION.encode())
    cats = sorted((int(c["id"]), str(c.get("name", ""))) for c in (categories or []))
    h.update(json.dumps(cats).encode())
    for key, fingerprint in sorted(fingerprints):
        h.update(f"{key}\0{fingerprint}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class DatasetDigest:
    digest: str
    images: int


def dataset_digest(source: Source | str, use_ray: bool = True) -> DatasetDigest:
    """The digest of a source's contents; with `use_ray`, records are hashed in parallel Ray tasks."""
    src = open_source(source) if isinstance(source, str) else source
    if use_ray:
        rows = read_source(src).map_batches(_fingerprint_batch, batch_format="pyarrow").take_all()
        pairs = [(str(r["key"]), str(r["fingerprint"])) for r in rows]
    else:
        pairs = [record_fingerprint(r) for r in iter_records(src)]
    pairs += [(f"planning:{e.image}", f"error:{e.reason}") for e in src.planning_errors]
    return DatasetDigest(combine_fingerprints(pairs, src.categories), len(pairs))
