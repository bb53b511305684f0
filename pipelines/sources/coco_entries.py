"""Checking an annotation file's entries before any image is planned from them.

A COCO file (and the COCO dicts YOLO and VOC folders become) is user input: an
image entry may lack its `file_name`, carry an id that is no integer or that an
earlier entry has, or name a path outside the image folder; an annotation may
have a `bbox` that is not four numbers. Each such entry becomes a row of the
errors table that names the file, the image and the entry, and the rest of the
dataset goes on. Image entries that cannot be used reject their image;
a malformed annotation is dropped and its image kept, as other annotation
problems are (`pipelines.validation.annotations`).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from pipelines import storage
from pipelines.validation.errors import DUPLICATE_IMAGE_ID, MALFORMED_IMAGE_ENTRY, UNSAFE_PATH, ErrorRecord


def integer(value: Any) -> int | None:
    """An id as JSON gives it: an integer (or a float without a fraction); None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_box(value: Any) -> bool:
    """A COCO bbox: 4 finite numbers."""
    return isinstance(value, (list, tuple)) and len(value) == 4 and all(_number(v) for v in value)


def checked_images(images: list, source: str, images_dir: str,
                   allow_outside_paths: bool = False) -> tuple[dict[int, dict], list[ErrorRecord]]:
    """The usable image entries by id (file order), and an error row for each entry that is not."""
    kept: dict[int, dict] = {}
    errors = []
    for index, entry in enumerate(images):
        where = f"images[{index}]"
        if not isinstance(entry, Mapping):
            errors.append(ErrorRecord(source, where, MALFORMED_IMAGE_ENTRY, f"{source}: {where} is not an object"))
            continue
        name = entry.get("file_name")
        if not isinstance(name, str) or not name:
            errors.append(ErrorRecord(source, where, MALFORMED_IMAGE_ENTRY,
                                      f"{source}: {where} (id {entry.get('id')!r}) has no file_name"))
            continue
        image_id = integer(entry.get("id"))
        if image_id is None:
            errors.append(ErrorRecord(source, name, MALFORMED_IMAGE_ENTRY,
                                      f"{source}: {where} ({name}): id {entry.get('id')!r} is not an integer"))
            continue
        if image_id in kept:
            errors.append(ErrorRecord(source, name, DUPLICATE_IMAGE_ID,
                                      f"{source}: {where} ({name}) has id {image_id}, which "
                                      f"{kept[image_id]['file_name']} has already; the first keeps it"))
            continue
        if not allow_outside_paths:
            reason = storage.escape_reason(name) or storage.link_escape_reason(images_dir,
                                                                                storage.join(images_dir, name))
            if reason is not None:
                errors.append(ErrorRecord(source, name, UNSAFE_PATH,
                                          f"{source}: {reason}, outside the image folder {images_dir} "
                                          "(allow it with --allow-outside-paths)"))
                continue
        kept[image_id] = {**entry, "id": image_id}
    return kept, errors


def annotation_problem(annotation: Any) -> str | None:
    """Why an instance annotation cannot be used (its bbox, category, crowd flag or area), or None."""
    if not isinstance(annotation, Mapping):
        return "is not an object"
    bbox = annotation.get("bbox")
    if not _is_box(bbox):
        return f"bbox {bbox!r} is not 4 finite numbers"
    if integer(annotation.get("category_id")) is None:
        return f"category_id {annotation.get('category_id')!r} is not an integer"
    if annotation.get("iscrowd", 0) not in (0, 1, False, True):
        return f"iscrowd {annotation.get('iscrowd')!r} is not 0 or 1"
    if "area" in annotation and annotation["area"] is not None and not _number(annotation["area"]):
        return f"area {annotation['area']!r} is not a number"
    return None


def segment_problem(segment: Any) -> str | None:
    """Why a panoptic `segments_info` entry cannot be used (its id or category), or None."""
    if not isinstance(segment, Mapping):
        return "is not an object"
    if integer(segment.get("id")) is None:
        return f"segment id {segment.get('id')!r} is not an integer"
    if integer(segment.get("category_id")) is None:
        return f"category_id {segment.get('category_id')!r} of segment {segment.get('id')} is not an integer"
    bbox = segment.get("bbox", (0, 0, 0, 0))
    if not _is_box(bbox):
        return f"bbox {bbox!r} of segment {segment.get('id')} is not 4 finite numbers"
    return None
