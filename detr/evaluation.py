"""COCO box evaluation with pycocotools: the twelve standard numbers and per-class AP.

As in pycocotools, a stat is -1 when the ground truth has no object in its range
(e.g. `AP_large` on a set of small objects), and a class's AP is NaN when the
class has no ground truth in the evaluated images.

Detections are converted to COCO results (xywh boxes in pixels, category ids as
the model predicts them: DETR's labels are category ids, see `DETRConfig`) and
scored by `COCOeval` against ground truth given as a `pycocotools.coco.COCO`, a
COCO JSON dict or a path. pycocotools' printing is captured, not shown.
"""
from __future__ import annotations

import contextlib
import copy
import io
import os
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.ops import box_convert

from .postprocess import Detections

STAT_NAMES = (
    "AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
    "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large",
)


def coco_results(detections: Mapping[int, Detections]) -> list[dict[str, Any]]:
    """{image_id: detections with xyxy pixel boxes} -> COCO results entries."""
    results = []
    for image_id, det in detections.items():
        boxes = det["boxes"].tolist()
        for (x0, y0, x1, y1), score, label in zip(boxes, det["scores"].tolist(), det["labels"].tolist()):
            results.append({"image_id": int(image_id), "category_id": int(label),
                            "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(score)})
    return results


def load_coco(ground_truth: COCO | Mapping[str, Any] | str | os.PathLike) -> COCO:
    if isinstance(ground_truth, COCO):
        return ground_truth
    with contextlib.redirect_stdout(io.StringIO()):
        if isinstance(ground_truth, Mapping):
            coco = COCO()
            coco.dataset = copy.deepcopy(dict(ground_truth))
            coco.dataset.setdefault("info", {})
            coco.createIndex()
            return coco
        return COCO(os.fspath(ground_truth))


def evaluate_coco(
    ground_truth: COCO | Mapping[str, Any] | str | os.PathLike,
    detections: Mapping[int, Detections],
    image_ids: list[int] | None = None,
) -> dict[str, Any]:
    """COCO bbox metrics: the 12 stats by name (0..1), `per_class` AP by category id, `pr_curves`
    (per category, precision at the 101 COCO recall points, IoU 0.5), `num_images`.

    `image_ids` limits evaluation to those images (default: the images detections
    were given for); images without detections still count their ground truth.
    """
    coco = load_coco(ground_truth)
    image_ids = sorted(int(i) for i in (image_ids if image_ids is not None else detections))
    results = coco_results({i: detections[i] for i in image_ids if i in detections})
    stats = {name: 0.0 for name in STAT_NAMES}
    per_class: dict[int, float] = {}
    pr_curves: dict[int, list[float]] = {}
    if image_ids and results:
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco.loadRes(results)
            evaluator = COCOeval(coco, coco_dt, "bbox")
            evaluator.params.imgIds = image_ids
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        stats = {name: float(v) for name, v in zip(STAT_NAMES, evaluator.stats)}
        precision = evaluator.eval["precision"]  # [IoU T, recall R, class K, area A, max dets M]
        for k, cat_id in enumerate(evaluator.params.catIds):
            p = precision[:, :, k, 0, -1]
            per_class[int(cat_id)] = float(np.mean(p[p > -1])) if (p > -1).any() else float("nan")
            pr_curves[int(cat_id)] = [max(float(v), 0.0) for v in precision[0, :, k, 0, -1]]  # IoU 0.5
    return {**stats, "per_class": per_class, "pr_curves": pr_curves, "num_images": len(image_ids)}


def coco_ground_truth(targets: Sequence[Mapping[str, Any]], categories: Sequence[Mapping[str, Any]] | None = None
                      ) -> dict[str, Any]:
    """A COCO ground-truth dict rebuilt from evaluation targets (as the data pipeline makes them).

    Each target holds "image_id", "orig_size" (h, w), "size" (h, w after the evaluation
    resize), "labels", normalised cxcywh "boxes" and "area" at "size"; boxes and areas
    are mapped back to the original image's pixels. Duplicate image ids (a target seen
    twice) are kept once. Categories default to the labels present.
    """
    images, annotations, seen = [], [], set()
    for t in targets:
        image_id = int(t["image_id"])
        if image_id in seen:
            continue
        seen.add(image_id)
        oh, ow = (int(v) for v in np.asarray(t["orig_size"]).reshape(2).tolist())
        sh, sw = (int(v) for v in np.asarray(t.get("size", t["orig_size"])).reshape(2).tolist())
        images.append({"id": image_id, "height": oh, "width": ow})
        boxes = torch.tensor(np.asarray(t["boxes"], dtype=np.float64).reshape(-1, 4))
        boxes = box_convert(boxes * torch.tensor([ow, oh, ow, oh], dtype=torch.float64), "cxcywh", "xywh")
        default_area = (boxes[:, 2] * boxes[:, 3]).numpy()
        areas = np.asarray(t.get("area", default_area), dtype=np.float64).reshape(-1)
        scale = (oh * ow) / max(sh * sw, 1)
        crowd = np.asarray(t.get("iscrowd", np.zeros(len(boxes))), dtype=np.int64).reshape(-1)
        labels = np.asarray(t["labels"], dtype=np.int64).reshape(-1)
        for box, label, area, iscrowd in zip(boxes.tolist(), labels.tolist(), (areas * scale).tolist(),
                                            crowd.tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label),
                                "bbox": box, "area": area, "iscrowd": int(iscrowd)})
    if categories is None:
        categories = [{"id": c, "name": str(c)} for c in sorted({a["category_id"] for a in annotations})]
    return {"images": images, "annotations": annotations, "categories": [dict(c) for c in categories]}
