"""The errors table: where bad records go instead of crashing a job.

Every pipeline that writes output writes an errors table beside it: a Parquet
file with one row per rejected image or annotation (`source`, `image`, `reason`,
`detail`). Reasons are short stable strings so that users can group and count
them; `detail` is the human-readable explanation. A run ends by printing a
`RunSummary`: how many images were read, kept, repaired and rejected by reason.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

# Image-level reasons: the whole image is rejected.
READ_ERROR = "read_error"
ZERO_BYTE = "zero_byte"
NOT_AN_IMAGE = "not_an_image"
TRUNCATED = "truncated"
DECODE_ERROR = "decode_error"
TOO_LARGE = "too_large"
UNSAFE_ARCHIVE_MEMBER = "unsafe_archive_member"
DUPLICATE_ARCHIVE_MEMBER = "duplicate_archive_member"
CHANGED_SINCE_LABELLED = "changed_since_labelled"  # other bytes under a key an output already labelled
BAD_LABEL_FILE = "bad_label_file"
# An annotation file's image entry that cannot be used: no file name, an id that is no integer, an id that an
# earlier entry has, or a path that leaves the image folder (absolute, or through '..').
MALFORMED_IMAGE_ENTRY = "malformed_image_entry"
DUPLICATE_IMAGE_ID = "duplicate_image_id"
UNSAFE_PATH = "unsafe_path"
# Annotation-level reasons: one annotation is dropped, the image is kept.
BOX_OUT_OF_IMAGE = "box_out_of_image"
DEGENERATE_BOX = "degenerate_box"
UNKNOWN_CATEGORY = "unknown_category"
MALFORMED_ANNOTATION = "malformed_annotation"  # a bbox that is not 4 finite numbers, a category that is no integer
# COCO panoptic (see pipelines.validation.panoptic): a PNG that cannot be read or does not fit its image
# rejects the image; a segment missing from the PNG or from the JSON is dropped.
PANOPTIC_PNG_ERROR = "panoptic_png_error"
PANOPTIC_SIZE_MISMATCH = "panoptic_size_mismatch"
SEGMENT_MISSING_FROM_PNG = "segment_missing_from_png"
SEGMENT_MISSING_FROM_JSON = "segment_missing_from_json"
# Repairs: the record is kept after a fix; counted, not written to the errors table.
REPAIR_BOX_CLIPPED = "box_clipped"
REPAIR_WRONG_EXTENSION = "wrong_extension"
REPAIR_EXIF_ROTATED = "exif_rotated"
REPAIR_CONVERTED_TO_RGB = "converted_to_rgb"

IMAGE_REASONS = frozenset(
    {READ_ERROR, ZERO_BYTE, NOT_AN_IMAGE, TRUNCATED, DECODE_ERROR, TOO_LARGE, UNSAFE_ARCHIVE_MEMBER,
     DUPLICATE_ARCHIVE_MEMBER, CHANGED_SINCE_LABELLED, BAD_LABEL_FILE, MALFORMED_IMAGE_ENTRY, DUPLICATE_IMAGE_ID, UNSAFE_PATH,
     PANOPTIC_PNG_ERROR, PANOPTIC_SIZE_MISMATCH}
)
ANNOTATION_REASONS = frozenset({BOX_OUT_OF_IMAGE, DEGENERATE_BOX, UNKNOWN_CATEGORY, MALFORMED_ANNOTATION,
                                SEGMENT_MISSING_FROM_PNG, SEGMENT_MISSING_FROM_JSON})

ERROR_COLUMNS = ("source", "image", "reason", "detail")


@dataclass(frozen=True)
class ErrorRecord:
    """One rejected record: which source and image, why (a stable reason), and details."""

    source: str
    image: str
    reason: str
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {"source": self.source, "image": self.image, "reason": self.reason, "detail": self.detail}


class PipelineError(Exception):
    """A record-level failure carrying its stable reason; caught and turned into an ErrorRecord."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def errors_schema():
    import pyarrow as pa

    return pa.schema([(name, pa.string()) for name in ERROR_COLUMNS])


def errors_to_table(errors: Iterable[ErrorRecord | Mapping[str, str]]):
    """An Arrow table in the errors-table schema (empty tables keep the schema)."""
    import pyarrow as pa

    rows = [e.as_dict() if isinstance(e, ErrorRecord) else dict(e) for e in errors]
    return pa.Table.from_pylist([{k: str(r.get(k, "")) for k in ERROR_COLUMNS} for r in rows],
                                schema=errors_schema())


def write_errors_table(errors: Iterable[ErrorRecord | Mapping[str, str]], path: str) -> str:
    """Write the errors table to `path` (local path or URI); returns the path written."""
    import pyarrow.parquet as pq

    from pipelines.storage import resolve

    fs, fs_path = resolve(path)
    parent = fs_path.rsplit("/", 1)[0] if "/" in fs_path else ""
    if parent:
        fs.create_dir(parent, recursive=True)
    pq.write_table(errors_to_table(errors), fs_path, filesystem=fs)
    return path


def read_errors_table(path: str) -> list[dict[str, str]]:
    """Read an errors table (a file or a folder of Parquet files) back as dicts."""
    import pyarrow.parquet as pq

    from pipelines.storage import resolve

    fs, fs_path = resolve(path)
    return pq.read_table(fs_path, filesystem=fs).to_pylist()


@dataclass
class RunSummary:
    """Counts for the summary a run prints: read, kept, repaired, rejected by reason."""

    images_read: int = 0
    images_kept: int = 0
    images_repaired: int = 0
    annotations_kept: int = 0
    rejected: Counter = field(default_factory=Counter)
    repairs: Counter = field(default_factory=Counter)

    def add(self, other: "RunSummary") -> "RunSummary":
        self.images_read += other.images_read
        self.images_kept += other.images_kept
        self.images_repaired += other.images_repaired
        self.annotations_kept += other.annotations_kept
        self.rejected.update(other.rejected)
        self.repairs.update(other.repairs)
        return self

    @classmethod
    def of_planning(cls, errors: Iterable[ErrorRecord]) -> "RunSummary":
        """The counts of what opening a source rejected: images whose entry was unusable count as read
        and rejected; annotation problems are counted by reason."""
        rejected = Counter(e.reason for e in errors)
        return cls(images_read=sum(n for reason, n in rejected.items() if reason in IMAGE_REASONS), rejected=rejected)

    @property
    def images_rejected(self) -> int:
        return sum(n for reason, n in self.rejected.items() if reason not in ANNOTATION_REASONS)

    def to_json(self) -> dict:
        return {
            "images_read": self.images_read,
            "images_kept": self.images_kept,
            "images_repaired": self.images_repaired,
            "images_rejected": self.images_rejected,
            "annotations_kept": self.annotations_kept,
            "rejected": dict(sorted(self.rejected.items())),
            "repairs": dict(sorted(self.repairs.items())),
        }

    @classmethod
    def from_json(cls, data: Mapping) -> "RunSummary":
        return cls(
            images_read=int(data.get("images_read", 0)),
            images_kept=int(data.get("images_kept", 0)),
            images_repaired=int(data.get("images_repaired", 0)),
            annotations_kept=int(data.get("annotations_kept", 0)),
            rejected=Counter(data.get("rejected", {})),
            repairs=Counter(data.get("repairs", {})),
        )

    def format(self) -> str:
        lines = [
            f"read {self.images_read} images: kept {self.images_kept} "
            f"({self.images_repaired} repaired), rejected {self.images_rejected}; "
            f"{self.annotations_kept} annotations kept"
        ]
        for title, counter in (("rejected", self.rejected), ("repaired", self.repairs)):
            for reason, n in sorted(counter.items()):
                lines.append(f"  {title:9s} {reason:24s} {n}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def summarize_errors(errors: Sequence[ErrorRecord | Mapping[str, str]]) -> Counter:
    """Count errors by reason."""
    return Counter((e.reason if isinstance(e, ErrorRecord) else e["reason"]) for e in errors)


def dumps(summary: RunSummary) -> str:
    return json.dumps(summary.to_json(), indent=2, sort_keys=True)
