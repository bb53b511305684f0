"""COCO instances JSON with a folder of images: the format DETR was trained on."""
from __future__ import annotations

import json
from collections import defaultdict

from pipelines import storage
from pipelines.errors import ErrorRecord
from pipelines.records import make_record
from pipelines.sources.base import Source, record_units

UNKNOWN_IMAGE = "unknown_image"


def load_coco_json(path: str) -> dict:
    """Parse a COCO JSON file (local or URI), with an error that names the file."""
    try:
        data = json.loads(storage.read_bytes(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: COCO annotation file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path}: not a COCO instances file (no 'images' list)")
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


def open_coco(annotations: str, images_dir: str | None = None, rows_per_unit: int = 1000) -> Source:
    """A COCO source; images are looked up under `images_dir` (default: the JSON's folder)."""
    if images_dir is None:
        images_dir = annotations.rsplit("/", 1)[0] if "/" in annotations else "."
    return coco_source(load_coco_json(annotations), images_dir, annotations, rows_per_unit)
