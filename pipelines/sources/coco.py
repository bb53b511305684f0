"""COCO instances JSON with a folder of images: the format DETR was trained on.

A COCO *panoptic* JSON (annotations with `segments_info`, see `pipelines.validation.panoptic`)
is recognised by its content and planned by `coco_panoptic_source`: one record per
image whose annotations are its segments (bbox, category, iscrowd, area, segment id)
and whose `panoptic_path` is its PNG, in the folder named like the JSON without
`.json` (COCO's layout) unless given.
"""
from __future__ import annotations

import json
from collections import defaultdict
from typing import Iterator

from detr.errors import RaydetrError
from pipelines import storage
from pipelines.sources.base import Source, record_units
from pipelines.sources.coco_entries import annotation_problem, checked_images, integer, segment_problem
from pipelines.sources.records import make_record
from pipelines.validation.errors import MALFORMED_ANNOTATION, UNSAFE_PATH, ErrorRecord

UNKNOWN_IMAGE = "unknown_image"


def load_coco_json(path: str) -> dict:
    """Parse a COCO JSON file (local or URI), with an error that names the file."""
    try:
        data = json.loads(storage.read_bytes(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: COCO annotation file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RaydetrError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise RaydetrError(f"{path}: not a COCO instances file (no 'images' list)")
    for field in ("annotations", "categories"):
        if not isinstance(data.get(field, []), list):
            raise RaydetrError(f"{path}: '{field}' is not a list")
    for index, category in enumerate(data.get("categories", [])):
        if not isinstance(category, dict) or integer(category.get("id")) is None:
            raise RaydetrError(f"{path}: categories[{index}] has no integer 'id' ({category!r})")
    return data


def _of_known_images(coco: dict, images: dict[int, dict], source: str, errors: list, what: str,
                     name_field: str) -> Iterator[tuple[int, dict]]:
    """(image id, annotation) for the annotations of usable images; an error row for each of the others."""
    for ann in coco.get("annotations", []):
        image_id = integer(ann.get("image_id")) if isinstance(ann, dict) else None
        if image_id in images:
            yield image_id, ann
            continue
        name = ann.get(name_field) if isinstance(ann, dict) else None
        errors.append(ErrorRecord(source, str(image_id), UNKNOWN_IMAGE,
                                  f"{what} {name} refers to image id {image_id}, not in 'images'"))


def coco_source(coco: dict, images_dir: str, source: str, rows_per_unit: int = 1000,
                allow_outside_paths: bool = False) -> Source:
    """Plan records from a parsed COCO dict: one per usable image entry, its usable annotations attached
    (the others are error rows, see `pipelines.sources.coco_entries`).

    COCO boxes describe the pixels as stored in the file (COCO's and the official
    DETR loader's convention), so they follow the EXIF orientation when decoded.
    """
    images, errors = checked_images(coco["images"], source, images_dir, allow_outside_paths)
    by_image: dict[int, list[dict]] = defaultdict(list)
    for image_id, ann in _of_known_images(coco, images, source, errors, "annotation", "id"):
        problem = annotation_problem(ann)
        if problem is not None:
            errors.append(ErrorRecord(source, images[image_id]["file_name"], MALFORMED_ANNOTATION,
                                      f"{source}: annotation {ann.get('id')} of {images[image_id]['file_name']}: "
                                      f"{problem}"))
            continue
        by_image[image_id].append(ann)
    records = []
    for image_id in sorted(images):
        img = images[image_id]
        file_name = str(img["file_name"])
        records.append(
            make_record(
                file_name,
                source=source,
                image_id=image_id,
                path=storage.join(images_dir, file_name),
                annotations=by_image.get(image_id, []),
                annotated_size=_annotated_size(img),
            )
        )
    categories = [dict(c) for c in coco.get("categories", [])]
    return Source("coco", source, record_units(records, "coco", rows_per_unit), categories, errors)


def _annotated_size(img: dict) -> tuple[int, int]:
    """(height, width) the entry records; 0 where it records none (or no integer)."""
    return integer(img.get("height", 0) or 0) or 0, integer(img.get("width", 0) or 0) or 0


def is_panoptic_json(coco: dict) -> bool:
    anns = coco.get("annotations") or []
    return bool(anns) and isinstance(anns[0], dict) and "segments_info" in anns[0]


def coco_panoptic_source(coco: dict, images_dir: str, masks_dir: str, source: str, rows_per_unit: int = 1000,
                         allow_outside_paths: bool = False) -> Source:
    """Plan records from a parsed COCO panoptic dict (segments as annotations, the PNG as `panoptic_path`)."""
    images, errors = checked_images(coco["images"], source, images_dir, allow_outside_paths)
    by_image: dict[int, dict] = {}
    for image_id, ann in _of_known_images(coco, images, source, errors, "panoptic annotation", "file_name"):
        png = ann.get("file_name")
        reason = None if allow_outside_paths or not isinstance(png, str) else storage.escape_reason(png)
        if not isinstance(png, str) or not png or reason is not None:
            problem = reason or f"file_name {png!r} names no PNG"
            errors.append(ErrorRecord(source, images[image_id]["file_name"], UNSAFE_PATH if reason else
                                      MALFORMED_ANNOTATION, f"{source}: panoptic annotation of image {image_id}: "
                                      f"{problem}"))
            continue
        by_image[image_id] = ann
    records = []
    for image_id in sorted(images):
        img = images[image_id]
        file_name = str(img["file_name"])
        ann = by_image.get(image_id)
        segments = []
        for segment in (ann.get("segments_info") or []) if ann is not None else []:
            problem = segment_problem(segment)
            if problem is not None:
                errors.append(ErrorRecord(source, file_name, MALFORMED_ANNOTATION,
                                          f"{source}: a segment of {file_name}: {problem}"))
                continue
            segments.append({"id": integer(segment["id"]), "bbox": segment.get("bbox", (0, 0, 0, 0)),
                             "category_id": integer(segment["category_id"]), "iscrowd": segment.get("iscrowd", 0),
                             "area": segment.get("area", 0)})
        records.append(
            make_record(
                file_name,
                source=source,
                image_id=image_id,
                path=storage.join(images_dir, file_name),
                annotations=segments if ann is not None else None,
                annotated_size=_annotated_size(img),
                panoptic_path=storage.join(masks_dir, str(ann["file_name"])) if ann is not None else "",
            )
        )
    categories = [dict(c) for c in coco.get("categories", [])]
    return Source("coco_panoptic", source, record_units(records, "coco", rows_per_unit), categories, errors)


def open_coco(annotations: str, images_dir: str | None = None, rows_per_unit: int = 1000,
              masks_dir: str | None = None, allow_outside_paths: bool = False) -> Source:
    """A COCO (instances or panoptic) source; images are looked up under `images_dir` (default: the
    JSON's folder), panoptic PNGs under `masks_dir` (default: the JSON's path without `.json`)."""
    if images_dir is None:
        images_dir = storage.parent(annotations)
    coco = load_coco_json(annotations)
    if is_panoptic_json(coco):
        if masks_dir is None:
            masks_dir = annotations[: -len(".json")] if annotations.lower().endswith(".json") else annotations
        return coco_panoptic_source(coco, images_dir, masks_dir, annotations, rows_per_unit, allow_outside_paths)
    return coco_source(coco, images_dir, annotations, rows_per_unit, allow_outside_paths)
