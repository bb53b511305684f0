"""YOLO label folders (one .txt per image, `class cx cy w h` normalised), converted to COCO.

The layout is the Ultralytics one: `ROOT/images/**/NAME.jpg` with
`ROOT/labels/**/NAME.txt` beside it, and the class names in `ROOT/classes.txt`
(one per line) or `ROOT/data.yaml` (`names:` list or mapping). Class index i
becomes COCO category id i + 1. YOLO coordinates are relative to the image as
displayed (EXIF orientation applied); the COCO boxes written are in the stored
frame, COCO's convention. Polygon (segment) lines are reduced to their extent.
An image without a label file is a negative example.
"""
from __future__ import annotations

import posixpath

import numpy as np

from detr.errors import RaydetrError
from pipelines import storage
from pipelines.validation.decode import display_size, orient_boxes, probe_image
from pipelines.validation.errors import MALFORMED_ANNOTATION, UNKNOWN_CATEGORY, ErrorRecord, PipelineError


def read_class_names(root: str, classes_file: str | None = None) -> list[str]:
    if classes_file is not None:
        return [ln.strip() for ln in storage.read_text(classes_file).splitlines() if ln.strip()]
    txt = storage.join(root, "classes.txt")
    if storage.exists(txt):
        return read_class_names(root, txt)
    for name in ("data.yaml", "dataset.yaml"):
        yml = storage.join(root, name)
        if storage.exists(yml):
            import yaml

            names = (yaml.safe_load(storage.read_text(yml)) or {}).get("names")
            if isinstance(names, dict):
                return [str(names[k]) for k in sorted(names, key=int)]
            if isinstance(names, list):
                return [str(n) for n in names]
            raise RaydetrError(f"{yml}: no 'names' list or mapping")
    raise FileNotFoundError(f"{root}: no classes.txt or data.yaml with class names (or pass a classes file)")


def _parse_label_line(line: str, lineno: int, label_path: str, num_classes: int) -> tuple[int, np.ndarray]:
    fields = line.split()
    try:
        values = [float(v) for v in fields]
    except ValueError:
        raise PipelineError(MALFORMED_ANNOTATION, f"{label_path}:{lineno}: not numbers: {line.strip()!r}") from None
    if len(values) < 5 or (len(values) > 5 and (len(values) - 1) % 2 != 0):
        raise PipelineError(MALFORMED_ANNOTATION,
                            f"{label_path}:{lineno}: expected 'class cx cy w h', got {len(values)} fields")
    cls = values[0]
    if cls != int(cls) or not 0 <= int(cls) < num_classes:
        raise PipelineError(UNKNOWN_CATEGORY, f"{label_path}:{lineno}: class {fields[0]} is not in 0..{num_classes - 1}")
    if len(values) == 5:
        cx, cy, w, h = values[1:]
        return int(cls), np.array([cx - w / 2, cy - h / 2, w, h])
    xy = np.asarray(values[1:]).reshape(-1, 2)  # polygon: its extent is the box
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    return int(cls), np.array([lo[0], lo[1], hi[0] - lo[0], hi[1] - lo[1]])


def yolo_to_coco(root: str, classes_file: str | None = None) -> tuple[dict, list[ErrorRecord]]:
    """Convert a YOLO dataset to a COCO dict (file names relative to ROOT/images) and errors."""
    names = read_class_names(root, classes_file)
    images_dir = storage.join(root, "images")
    labels_dir = storage.join(root, "labels")
    fs_images = storage.resolve(images_dir)[1]
    coco = {"images": [], "annotations": [],
            "categories": [{"id": i + 1, "name": n, "supercategory": ""} for i, n in enumerate(names)]}
    errors: list[ErrorRecord] = []
    next_ann = 1
    for image_id, image_path in enumerate(storage.list_files(images_dir, storage.IMAGE_EXTENSIONS), start=1):
        rel = posixpath.relpath(storage.resolve(image_path)[1], fs_images)
        try:
            stored, orientation = probe_image(storage.read_bytes(image_path), image_path)
        except PipelineError as exc:
            errors.append(ErrorRecord(root, rel, exc.reason, exc.detail))
            continue
        disp_h, disp_w = display_size(stored, orientation)
        coco["images"].append({"id": image_id, "file_name": rel, "height": stored[0], "width": stored[1]})
        label_path = storage.join(labels_dir, posixpath.splitext(rel)[0] + ".txt")
        if not storage.exists(label_path):
            continue
        for lineno, line in enumerate(storage.read_text(label_path).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                cls, box = _parse_label_line(line, lineno, label_path, len(names))
            except PipelineError as exc:
                errors.append(ErrorRecord(root, rel, exc.reason, exc.detail))
                continue
            pixels = box * np.array([disp_w, disp_h, disp_w, disp_h])
            bbox = orient_boxes(pixels[None], orientation, (disp_h, disp_w), inverse=True)[0]
            coco["annotations"].append({
                "id": next_ann, "image_id": image_id, "category_id": cls + 1,
                "bbox": [round(float(v), 3) for v in bbox], "area": round(float(bbox[2] * bbox[3]), 3), "iscrowd": 0,
            })
            next_ann += 1
    return coco, errors
