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

from detr.errors import RaydetrError
from pipelines import storage
from pipelines.sources.base import Source, record_units
from pipelines.sources.records import make_record
from pipelines.validation.errors import ErrorRecord

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
    return data


def coco_source(coco: dict, images_dir: str, source: str, rows_per_unit: int = 1000) -> Source:
    """Plan records from a parsed COCO dict: one per image, its annotations attached.

    COCO boxes describe the pixels as stored in the file (COCO's and the official
    DETR loader's convention), so they follow the EXIF orientation when decoded.
    """
    by_image: dict[int, list[dict]] = defaultdict(list)
    image_ids = {int(img["id"]) for img in coco["images"]}
    errors = []
    for ann in coco.get("annotations", []):
        image_id = int(ann.get("image_id", -1))
        if image_id not in image_ids:
            errors.append(ErrorRecord(source, str(image_id), UNKNOWN_IMAGE,
                                      f"annotation {ann.get('id')} refers to image id {image_id}, not in 'images'"))
            continue
        by_image[image_id].append(ann)
    records = []
    for img in sorted(coco["images"], key=lambda im: int(im["id"])):
        file_name = str(img["file_name"])
        records.append(
            make_record(
                file_name,
                source=source,
                image_id=int(img["id"]),
                path=storage.join(images_dir, file_name),
                annotations=by_image.get(int(img["id"]), []),
                annotated_size=(int(img.get("height", 0) or 0), int(img.get("width", 0) or 0)),
            )
        )
    categories = [dict(c) for c in coco.get("categories", [])]
    return Source("coco", source, record_units(records, "coco", rows_per_unit), categories, errors)


def is_panoptic_json(coco: dict) -> bool:
    anns = coco.get("annotations") or []
    return bool(anns) and isinstance(anns[0], dict) and "segments_info" in anns[0]


def coco_panoptic_source(coco: dict, images_dir: str, masks_dir: str, source: str, rows_per_unit: int = 1000) -> Source:
    """Plan records from a parsed COCO panoptic dict (segments as annotations, the PNG as `panoptic_path`)."""
    images = {int(img["id"]): img for img in coco["images"]}
    by_image: dict[int, dict] = {}
    errors = []
    for ann in coco.get("annotations", []):
        image_id = int(ann.get("image_id", -1))
        if image_id not in images:
            errors.append(ErrorRecord(source, str(image_id), UNKNOWN_IMAGE,
                                      f"panoptic annotation {ann.get('file_name')} refers to image id {image_id}, "
                                      "not in 'images'"))
            continue
        by_image[image_id] = ann
    records = []
    for image_id in sorted(images):
        img = images[image_id]
        file_name = str(img["file_name"])
        ann = by_image.get(image_id)
        segments = [] if ann is None else [
            {"id": int(s["id"]), "bbox": s.get("bbox", (0, 0, 0, 0)), "category_id": s.get("category_id", -1),
             "iscrowd": s.get("iscrowd", 0), "area": s.get("area", 0)} for s in ann.get("segments_info", [])]
        records.append(
            make_record(
                file_name,
                source=source,
                image_id=image_id,
                path=storage.join(images_dir, file_name),
                annotations=segments if ann is not None else None,
                annotated_size=(int(img.get("height", 0) or 0), int(img.get("width", 0) or 0)),
                panoptic_path=storage.join(masks_dir, str(ann["file_name"])) if ann is not None else "",
            )
        )
    categories = [dict(c) for c in coco.get("categories", [])]
    return Source("coco_panoptic", source, record_units(records, "coco", rows_per_unit), categories, errors)


def open_coco(annotations: str, images_dir: str | None = None, rows_per_unit: int = 1000,
              masks_dir: str | None = None) -> Source:
    """A COCO (instances or panoptic) source; images are looked up under `images_dir` (default: the
    JSON's folder), panoptic PNGs under `masks_dir` (default: the JSON's path without `.json`)."""
    if images_dir is None:
        images_dir = annotations.rsplit("/", 1)[0] if "/" in annotations else "."
    coco = load_coco_json(annotations)
    if is_panoptic_json(coco):
        if masks_dir is None:
            masks_dir = annotations[: -len(".json")] if annotations.lower().endswith(".json") else annotations
        return coco_panoptic_source(coco, images_dir, masks_dir, annotations, rows_per_unit)
    return coco_source(coco, images_dir, annotations, rows_per_unit)
