"""Pascal VOC XML annotations (`ROOT/Annotations/*.xml`, `ROOT/JPEGImages/`), converted to COCO.

VOC pixel coordinates are 1-based and inclusive: a box from xmin to xmax covers
xmax - xmin + 1 pixels, so COCO's (x, y, w, h) is (xmin - 1, ymin - 1,
xmax - xmin + 1, ymax - ymin + 1). `difficult` objects become `iscrowd` 1, so
that evaluation ignores them and training leaves them out, as VOC's own
protocol does. Category ids are 1.. in the order of `class_names` (default: the
sorted names found in the XML files).
"""
from __future__ import annotations

import posixpath
import xml.etree.ElementTree as ET

from pipelines import storage
from pipelines.validation.decode import probe_image
from pipelines.validation.errors import (BAD_LABEL_FILE, MALFORMED_ANNOTATION, UNKNOWN_CATEGORY, ErrorRecord,
                                         PipelineError)


def _parse(xml_path: str) -> ET.Element:
    try:
        return ET.fromstring(storage.read_bytes(xml_path))
    except ET.ParseError as exc:
        raise PipelineError(BAD_LABEL_FILE, f"{xml_path}: not valid XML ({exc})") from None


def _number(node: ET.Element, tag: str, where: str) -> float:
    text = node.findtext(tag)
    try:
        return float(text)
    except (TypeError, ValueError):
        raise PipelineError(MALFORMED_ANNOTATION, f"{where}: <{tag}> is {text!r}, not a number") from None


def _size(tree: ET.Element, tag: str) -> int:
    """A <size> field, or 0 (read from the image instead) when it is missing or not a number."""
    try:
        return int(float(tree.findtext(tag) or 0))
    except ValueError:
        return 0


def voc_to_coco(root: str, class_names: list[str] | None = None) -> tuple[dict, list[ErrorRecord]]:
    """Convert a VOC dataset to a COCO dict (file names relative to ROOT/JPEGImages) and errors."""
    ann_dir = storage.join(root, "Annotations")
    xml_files = storage.list_files(ann_dir, extensions=(".xml",))
    parsed: list[tuple[str, ET.Element]] = []
    errors: list[ErrorRecord] = []
    for xml_path in xml_files:
        try:
            parsed.append((xml_path, _parse(xml_path)))
        except PipelineError as exc:
            errors.append(ErrorRecord(root, posixpath.basename(xml_path), exc.reason, exc.detail))
    if class_names is None:
        class_names = sorted({(o.findtext("name") or "").strip() for _, r in parsed for o in r.iter("object")} - {""})
    cat_ids = {name: i + 1 for i, name in enumerate(class_names)}
    coco = {"images": [], "annotations": [],
            "categories": [{"id": i, "name": n, "supercategory": ""} for n, i in cat_ids.items()]}
    next_ann = 1
    for image_id, (xml_path, tree) in enumerate(parsed, start=1):
        file_name = (tree.findtext("filename") or posixpath.splitext(posixpath.basename(xml_path))[0] + ".jpg").strip()
        width, height = _size(tree, "size/width"), _size(tree, "size/height")
        if width <= 0 or height <= 0:
            try:
                (height, width), _ = probe_image(storage.read_bytes(storage.join(root, "JPEGImages", file_name)), file_name)
            except (PipelineError, FileNotFoundError, OSError) as exc:
                errors.append(ErrorRecord(root, file_name, getattr(exc, "reason", BAD_LABEL_FILE),
                                          f"{xml_path}: no <size> and the image cannot be read ({exc})"))
                continue
        coco["images"].append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        for k, obj in enumerate(tree.iter("object")):
            where = f"{xml_path} object {k}"
            name = (obj.findtext("name") or "").strip()
            if name not in cat_ids:
                errors.append(ErrorRecord(root, file_name, UNKNOWN_CATEGORY, f"{where}: class {name!r} is not in the class list"))
                continue
            try:
                bb = obj.find("bndbox")
                if bb is None:
                    raise PipelineError(MALFORMED_ANNOTATION, f"{where}: no <bndbox>")
                x1, y1, x2, y2 = (_number(bb, t, where) for t in ("xmin", "ymin", "xmax", "ymax"))
            except PipelineError as exc:
                errors.append(ErrorRecord(root, file_name, exc.reason, exc.detail))
                continue
            w, h = x2 - x1 + 1, y2 - y1 + 1
            coco["annotations"].append({
                "id": next_ann, "image_id": image_id, "category_id": cat_ids[name],
                "bbox": [x1 - 1, y1 - 1, w, h], "area": max(w, 0) * max(h, 0),
                "iscrowd": int((obj.findtext("difficult") or "0").strip() == "1"),
            })
            next_ann += 1
    return coco, errors
