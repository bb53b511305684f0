"""From a record to a checked image: read the bytes, decode, orient the boxes, validate.

`load_record` is the single path every job uses to turn a record into pixels and
trustworthy annotations; it never raises for a bad record, it returns the
errors instead. `decode_batch` is the same for Ray Data batches without
annotations (what a labelling job feeds its model actors).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Collection, Iterable, Iterator, Mapping

import numpy as np

from pipelines import storage
from pipelines.sources.records import box_array, float_array, int_array
from pipelines.validation import errors as E
from pipelines.validation.annotations import CheckedAnnotations, check_annotations
from pipelines.validation.decode import DecodedImage, DecodeLimits, decode_image, orient_boxes


@dataclass
class LoadedImage:
    """A decoded image (display orientation, RGB) and its validated annotations (None: unlabelled)."""

    key: str
    source: str
    image_id: int
    data: bytes
    image: DecodedImage
    annotations: CheckedAnnotations | None
    repairs: list[str] = field(default_factory=list)


def read_record_bytes(record: Mapping[str, Any]) -> bytes:
    """The record's inline bytes, or the bytes at its path; raises PipelineError(read_error)."""
    data = record.get("bytes")
    if data is not None:
        return bytes(data)
    path = record.get("path") or ""
    try:
        return storage.read_bytes(path)
    except storage.StoreUnavailableError:
        raise  # a store that cannot be reached is not a bad image: the task fails, and a re-run resumes
    except (OSError, ValueError) as exc:
        raise E.PipelineError(E.READ_ERROR, f"{path or record.get('key')}: cannot read ({exc})") from None


def first_images(records: Iterable[Mapping[str, Any]], count: int) -> Iterator[tuple[str, DecodedImage]]:
    """(key, decoded image) of the first `count` records that read and decode; the others are skipped (a
    sample for previews or calibration: bad images are the errors table's to report, not a sample's)."""
    found = 0
    for record in records:
        if found >= count:
            return
        key = str(record.get("key", ""))
        try:
            decoded = decode_image(read_record_bytes(record), key)
        except E.PipelineError:
            continue
        found += 1
        yield key, decoded


def _boxes_in_display_frame(record: Mapping[str, Any], decoded: DecodedImage, boxes: np.ndarray) -> np.ndarray:
    """Move boxes annotated on the stored pixels through the EXIF orientation, like the pixels.

    An annotation file that recorded the *displayed* size (which differs from the
    stored one only for 90-degree orientations) was made on the displayed image:
    its boxes are left alone.
    """
    if decoded.orientation == 1 or len(boxes) == 0 or record.get("boxes_in_display_frame"):
        return boxes
    annotated = (int(record.get("annotated_height") or 0), int(record.get("annotated_width") or 0))
    shown = (decoded.height, decoded.width)
    if annotated == shown and shown != tuple(decoded.stored_size):
        return boxes
    return orient_boxes(boxes, decoded.orientation, decoded.stored_size)


def _read_segments(record: Mapping[str, Any], decoded: DecodedImage, segment_ids: np.ndarray):
    """The record's panoptic PNG, checked against the decoded image and its segment list."""
    from pipelines.validation.panoptic import decode_segments

    path = str(record["panoptic_path"])
    data = record.get("panoptic_png")
    if data is None:
        try:
            data = storage.read_bytes(path)
        except storage.StoreUnavailableError:
            raise
        except (OSError, ValueError) as exc:
            raise E.PipelineError(E.PANOPTIC_PNG_ERROR, f"{path}: cannot read the panoptic PNG ({exc})") from None
    return decode_segments(data, path, (decoded.height, decoded.width), segment_ids)


def load_record(
    record: Mapping[str, Any],
    known_categories: Collection[int] | None = None,
    limits: DecodeLimits = DecodeLimits(),
) -> tuple[LoadedImage | None, list[E.ErrorRecord]]:
    """Load one record. Returns (image or None when rejected, error rows for the errors table)."""
    key = str(record.get("key", ""))
    source = str(record.get("source", ""))
    if record.get("error_reason"):
        return None, [E.ErrorRecord(source, key, str(record["error_reason"]), str(record.get("error_detail", "")))]
    try:
        data = read_record_bytes(record)
        decoded = decode_image(data, key, limits)
    except E.PipelineError as exc:
        return None, [E.ErrorRecord(source, key, exc.reason, exc.detail)]
    repairs = list(decoded.repairs)
    checked = None
    errors: list[E.ErrorRecord] = []
    if record.get("has_annotations"):
        boxes = _boxes_in_display_frame(record, decoded, box_array(record.get("boxes")))
        category_ids = int_array(record.get("category_ids"))
        iscrowd = int_array(record.get("iscrowd"), np.int8)
        area = float_array(record.get("area"))
        annotation_ids = int_array(record.get("annotation_ids"))
        segments = None
        if record.get("panoptic_path"):
            try:
                segments = _read_segments(record, decoded, annotation_ids)
            except E.PipelineError as exc:
                return None, [E.ErrorRecord(source, key, exc.reason, exc.detail)]
            errors += [E.ErrorRecord(source, key, reason, detail) for reason, detail in segments.rejected]
            listed = np.isin(annotation_ids, segments.segment_ids)
            boxes, category_ids, annotation_ids = boxes[listed], category_ids[listed], annotation_ids[listed]
            iscrowd = iscrowd[listed] if len(iscrowd) else iscrowd
            area = area[listed] if len(area) else area
        checked = check_annotations(
            boxes, category_ids, iscrowd, area, annotation_ids, decoded.width, decoded.height, known_categories,
        )
        errors += [E.ErrorRecord(source, key, reason, detail) for reason, detail in checked.rejected]
        if segments is not None:
            order = {int(s): i for i, s in enumerate(segments.segment_ids)}
            checked.masks = segments.masks[[order[int(a)] for a in checked.annotation_ids]].reshape(
                -1, decoded.height, decoded.width)
        repairs += [E.REPAIR_BOX_CLIPPED] * checked.repaired
    loaded = LoadedImage(key, source, int(record.get("image_id", 0)), data, decoded, checked, repairs)
    return loaded, errors


def tally(summary: E.RunSummary, loaded: LoadedImage | None, errors: list[E.ErrorRecord]) -> None:
    """Count one loaded record into a run summary."""
    summary.images_read += 1
    if loaded is not None:
        summary.images_kept += 1
        summary.images_repaired += int(bool(loaded.repairs))
        summary.repairs.update(loaded.repairs)
        if loaded.annotations is not None:
            summary.annotations_kept += len(loaded.annotations.boxes)
    summary.rejected.update(e.reason for e in errors)


def decode_batch(batch: Mapping[str, Any], limits: DecodeLimits = DecodeLimits()) -> dict[str, Any]:
    """Ray Data batch of records -> `key`, `source`, `image_id`, `image` (HWC uint8 RGB, display
    orientation), `height`, `width`, `content_hash` (sha256 of the file's bytes), `error_reason`,
    `error_detail`. Bad rows stay, with an empty image and a reason, so that the caller decides where
    they go (nothing is dropped silently)."""
    keys = list(batch["key"])
    columns = ("key", "source", "image_id", "image", "height", "width", "content_hash", "error_reason", "error_detail")
    out: dict[str, list] = {k: [] for k in columns}
    for i, key in enumerate(keys):
        record = {name: batch[name][i] for name in ("key", "source", "path", "bytes", "error_reason", "error_detail")
                  if name in batch}
        image = np.zeros((0, 0, 3), np.uint8)
        reason = detail = content_hash = ""
        if record.get("error_reason"):
            reason, detail = str(record["error_reason"]), str(record.get("error_detail", ""))
        else:
            try:
                data = read_record_bytes(record)
                content_hash = hashlib.sha256(data).hexdigest()
                image = decode_image(data, str(key), limits).array
            except E.PipelineError as exc:
                reason, detail = exc.reason, exc.detail
        out["key"].append(str(key))
        out["source"].append(str(record.get("source") or ""))
        out["content_hash"].append(content_hash)
        out["image_id"].append(int(batch["image_id"][i]) if "image_id" in batch else 0)
        out["image"].append(image)
        out["height"].append(int(image.shape[0]))
        out["width"].append(int(image.shape[1]))
        out["error_reason"].append(reason)
        out["error_detail"].append(detail)
    return {
        "key": np.array(out["key"], dtype=object),
        "source": np.array(out["source"], dtype=object),
        "image_id": np.array(out["image_id"], dtype=np.int64),
        "image": out["image"],
        "height": np.array(out["height"], dtype=np.int64),
        "width": np.array(out["width"], dtype=np.int64),
        "content_hash": np.array(out["content_hash"], dtype=object),
        "error_reason": np.array(out["error_reason"], dtype=object),
        "error_detail": np.array(out["error_detail"], dtype=object),
    }
