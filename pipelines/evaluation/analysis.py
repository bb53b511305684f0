"""The analyses of the DETR paper's evaluation (Carion et al. 2020), as numbers a job can `json.dump`.

Each function takes one `ImageAnalysis` per evaluated image and returns plain data (dicts, lists, floats, ints,
strings); `pipelines.evaluation.analysis_plots` draws the pictures from it:

- `per_layer_ap`: COCO AP of every decoder layer's predictions, with and without NMS (paper Fig. 4): shows what
  each layer adds, and that a set-trained model needs no NMS at its last layer.
- `confusion_matrix`: which classes the last layer mistakes for which, and what it misses or invents.
- `missed_by_instance_count`: instances missed against instances per image (paper Fig. 12): does the model run
  out of queries, or saturate, when an image holds many objects of one class?
- `slot_boxes`: where each query slot puts its boxes across images (paper Fig. 7): the slots' specialisation.
- `error_counts`: false positives and negatives per image, worst first, to pick images for a grid.

The last three analyses use the last decoder layer's predictions with score strictly above `score`, matched to
ground truth by one greedy rule, `greedy_match`. AP comes from pycocotools (`detr.evaluation.evaluate_coco`, which
silences its prints); a number pycocotools cannot give (no ground truth: its -1) is NaN, which `json.dump` writes
as `NaN`.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from pycocotools.coco import COCO
from torchvision.ops import batched_nms, box_convert, box_iou

from detr.evaluation import evaluate_coco, load_coco

MAX_DETECTIONS = 100
"""Detections kept per image for AP, by score: COCO's maxDets."""
BACKGROUND = "background"


@dataclass
class ImageAnalysis:
    """What one evaluated image contributes to the analyses."""
    image_id: int
    size: tuple[int, int]
    """Original (height, width)."""
    gt_boxes: np.ndarray
    """[N, 4] float xyxy, original pixels."""
    gt_labels: np.ndarray
    """[N] int category ids."""
    layers: list[dict[str, np.ndarray]]
    """One per decoder layer, first to last: "boxes" [Q, 4] xyxy original pixels, "scores" [Q], "labels" [Q]
    (every query, already post-processed: best class and its probability)."""
    slot_boxes: np.ndarray
    """[Q, 4] the final layer's boxes as normalised (cx, cy, w, h) in [0, 1], in query slot order."""
    slot_scores: np.ndarray
    """[Q]"""


def greedy_match(pred_boxes: np.ndarray, pred_scores: np.ndarray, gt_boxes: np.ndarray, iou: float = 0.5,
                 pred_labels: np.ndarray | None = None, gt_labels: np.ndarray | None = None) -> np.ndarray:
    """For each prediction, the index of the ground-truth box it matches, or -1: the one rule every count here uses.

    Predictions take turns by descending score (ties: input order); each takes the still unmatched ground-truth
    box of highest IoU >= `iou`, of its own class when labels are given. So a box is matched at most once and a
    duplicate counts as a false positive, as in COCO's matching at one IoU threshold.
    """
    matched = np.full(len(pred_boxes), -1, dtype=np.int64)
    if len(pred_boxes) == 0 or len(gt_boxes) == 0:
        return matched
    overlaps = np.nan_to_num(box_iou(_tensor(pred_boxes), _tensor(gt_boxes)).numpy(), nan=0.0)
    if pred_labels is not None and gt_labels is not None:
        same_class = np.asarray(pred_labels).reshape(-1, 1) == np.asarray(gt_labels).reshape(1, -1)
        overlaps = np.where(same_class, overlaps, -1.0)
    taken = np.zeros(len(gt_boxes), dtype=bool)
    for p in np.argsort(-np.asarray(pred_scores, dtype=np.float64), kind="stable"):
        candidates = np.where(taken, -1.0, overlaps[p])
        best = int(np.argmax(candidates))
        if candidates[best] >= iou:
            matched[p] = best
            taken[best] = True
    return matched


def _tensor(boxes: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.array(boxes, dtype=np.float64).reshape(-1, 4))


# --- AP per decoder layer (Fig. 4) ---


def per_layer_ap(images: Sequence[ImageAnalysis], categories: Sequence[Mapping[str, Any]],
                 nms_iou: float = 0.5, refined: int = 0) -> list[dict[str, Any]]:
    """COCO AP and AP50 of each decoder layer, without and with class-wise NMS at `nms_iou` (paper Fig. 4).

    The paper's point: NMS helps the early layers, whose queries still duplicate each other, and not the last one,
    which the set loss taught to predict each object once. `[{"layer": 1, "boxes": "decoder", "AP", "AP50",
    "AP_nms", "AP50_nms"}, ...]`, first layer first; the last `refined` outputs are a box refiner's
    (`detr.roi_refine`: the decoder's last layer's queries with corrected boxes), marked `"boxes": "refined"`.
    NaN where the ground truth has no box of `categories`.
    """
    ground_truth = load_coco(_coco_ground_truth(images, categories))
    rows = []
    depth = _decoder_depth(images)
    for layer in range(depth):
        ap, ap50 = _layer_ap(ground_truth, images, layer, None)
        ap_nms, ap50_nms = _layer_ap(ground_truth, images, layer, nms_iou)
        rows.append({"layer": layer + 1, "boxes": "refined" if layer >= depth - refined else "decoder", "AP": ap,
                     "AP50": ap50, "AP_nms": ap_nms, "AP50_nms": ap50_nms})
    return rows


def _decoder_depth(images: Sequence[ImageAnalysis]) -> int:
    """The number of decoder layers, which every image must share (a layer's AP is over all images)."""
    depths = {len(image.layers) for image in images}
    if len(depths) > 1:
        raise ValueError(f"images disagree on the number of decoder layers: {sorted(depths)}")
    return depths.pop() if depths else 0


def _coco_ground_truth(images: Sequence[ImageAnalysis], categories: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The images' ground truth as a COCO dict, for COCOeval in memory (annotation ids from 1: COCOeval reads a
    matched ground-truth id of 0 as unmatched)."""
    coco_images, annotations = [], []
    for image in images:
        height, width = (int(v) for v in image.size)
        coco_images.append({"id": int(image.image_id), "height": height, "width": width})
        boxes = box_convert(_tensor(image.gt_boxes), "xyxy", "xywh")
        for box, label in zip(boxes.tolist(), np.asarray(image.gt_labels).reshape(-1).tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": int(image.image_id), "category_id": int(label),
                                "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
    return {"images": coco_images, "annotations": annotations,
            "categories": [{"id": int(c["id"]), "name": str(c["name"])} for c in categories]}


def _layer_ap(ground_truth: COCO, images: Sequence[ImageAnalysis], layer: int,
              nms_iou: float | None) -> tuple[float, float]:
    """(AP, AP50) of one decoder layer over all images; NaN for both where there is nothing to find."""
    if not ground_truth.getCatIds() or not ground_truth.getAnnIds(catIds=ground_truth.getCatIds()):
        return math.nan, math.nan
    detections = {int(image.image_id): _layer_detections(image.layers[layer], nms_iou) for image in images}
    stats = evaluate_coco(ground_truth, detections, image_ids=[int(image.image_id) for image in images])
    return _coco_number(stats["AP"]), _coco_number(stats["AP50"])


def _layer_detections(layer: Mapping[str, np.ndarray], nms_iou: float | None) -> dict[str, torch.Tensor]:
    """One layer's predictions as COCO will score them: score > 0, class-wise NMS if asked, the best 100."""
    boxes = _tensor(layer["boxes"])
    scores = torch.as_tensor(np.array(layer["scores"], dtype=np.float64).reshape(-1))
    labels = torch.as_tensor(np.array(layer["labels"], dtype=np.int64).reshape(-1))
    keep = torch.nonzero(scores > 0).flatten()
    if nms_iou is None:
        keep = keep[torch.argsort(scores[keep], descending=True, stable=True)]
    else:
        keep = keep[batched_nms(boxes[keep], scores[keep], labels[keep], nms_iou)]  # sorted by score
    keep = keep[:MAX_DETECTIONS]
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}


def _coco_number(value: float) -> float:
    """pycocotools' -1 ("nothing to measure") as NaN."""
    return math.nan if value < 0 else float(value)


# --- last-layer errors: confusion, missed instances (Fig. 12), errors per image ---


def _last_layer(image: ImageAnalysis, score: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The final decoder layer's (boxes, scores, labels) with score > `score`: the predictions a user would keep."""
    if not image.layers:
        return np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64)
    last = image.layers[-1]
    scores = np.asarray(last["scores"], dtype=np.float64).reshape(-1)
    keep = scores > score
    boxes = np.asarray(last["boxes"], dtype=np.float64).reshape(-1, 4)
    labels = np.asarray(last["labels"], dtype=np.int64).reshape(-1)
    return boxes[keep], scores[keep], labels[keep]


def _gt(image: ImageAnalysis) -> tuple[np.ndarray, np.ndarray]:
    return (np.asarray(image.gt_boxes, dtype=np.float64).reshape(-1, 4),
            np.asarray(image.gt_labels, dtype=np.int64).reshape(-1))


def _same_class_matches(image: ImageAnalysis, iou: float, score: float) -> tuple[np.ndarray, int]:
    """(ground-truth index or -1 per kept prediction, number of ground-truth boxes) under same-class matching."""
    boxes, scores, labels = _last_layer(image, score)
    gt_boxes, gt_labels = _gt(image)
    return greedy_match(boxes, scores, gt_boxes, iou, labels, gt_labels), len(gt_labels)


def confusion_matrix(images: Sequence[ImageAnalysis], categories: Sequence[Mapping[str, Any]], iou: float = 0.5,
                     score: float = 0.5) -> dict[str, Any]:
    """Counts of (true class, predicted class) of the last layer's predictions with score > `score`.

    Matching ignores the class (a box found with the wrong label is a confusion, not a miss plus a false positive);
    the last row counts unmatched predictions (background predicted as a class), the last column unmatched ground
    truth (missed). Boxes and predictions whose category id is not in `categories` are left out before matching.
    """
    ids = [int(c["id"]) for c in categories]
    matrix = np.zeros((len(ids) + 1, len(ids) + 1), dtype=np.int64)
    for image in images:
        np.add.at(matrix, _confusion_cells(image, ids, iou, score), 1)
    return {"classes": [str(c["name"]) for c in categories] + [BACKGROUND], "category_ids": ids, "iou": float(iou),
            "score": float(score), "matrix": matrix.tolist()}


def _confusion_cells(image: ImageAnalysis, ids: list[int], iou: float,
                     score: float) -> tuple[np.ndarray, np.ndarray]:
    """(rows, columns) of the confusion matrix, one cell per kept prediction and per missed box of one image;
    index len(ids) is background."""
    index = {cat_id: i for i, cat_id in enumerate(ids)}
    background = len(ids)
    boxes, scores, labels = _last_layer(image, score)
    known = np.isin(labels, ids)
    gt_boxes, gt_labels = _gt(image)
    known_gt = np.isin(gt_labels, ids)
    gt_labels = gt_labels[known_gt]
    gt_of_pred = greedy_match(boxes[known], scores[known], gt_boxes[known_gt], iou)
    missed = np.setdiff1d(np.arange(len(gt_labels)), gt_of_pred)
    rows = [index[int(gt_labels[g])] if g >= 0 else background for g in gt_of_pred]
    rows += [index[int(gt_labels[g])] for g in missed]
    columns = [index[int(label)] for label in labels[known]] + [background] * len(missed)
    return np.asarray(rows, dtype=np.int64), np.asarray(columns, dtype=np.int64)


def missed_by_instance_count(images: Sequence[ImageAnalysis], categories: Sequence[Mapping[str, Any]],
                             iou: float = 0.5, score: float = 0.5) -> dict[str, list[dict[str, float | int]]]:
    """Per class, the mean number of its instances missed in images holding n of them (paper Fig. 12).

    A model whose queries or attention saturate misses more as n grows; DETR's paper shows it does not, up to the
    number of queries. A box is missed when no same-class prediction with score > `score` matches it (IoU >= `iou`,
    `greedy_match`). `{class_name: [{"instances": n, "images": k, "mean_missed": m}, ...]}`, n ascending; a class
    with no instance has an empty list.
    """
    missed_per_image: dict[int, dict[int, list[int]]] = {int(c["id"]): defaultdict(list) for c in categories}
    for image in images:
        gt_of_pred, count = _same_class_matches(image, iou, score)
        gt_labels = _gt(image)[1]
        missed = ~np.isin(np.arange(count), gt_of_pred)
        for cat_id in np.unique(gt_labels).tolist():
            if cat_id in missed_per_image:
                of_class = gt_labels == cat_id
                missed_per_image[cat_id][int(of_class.sum())].append(int(missed[of_class].sum()))
    return {str(c["name"]): [{"instances": n, "images": len(counts), "mean_missed": float(np.mean(counts))}
                             for n, counts in sorted(missed_per_image[int(c["id"])].items())] for c in categories}


def error_counts(images: Sequence[ImageAnalysis], iou: float = 0.5,
                 score: float = 0.5) -> list[dict[str, int]]:
    """False positives and false negatives of the last layer per image (same-class `greedy_match`), the worst
    (most FP + FN) first, ties by image id: the images to look at first.

    `[{"image_id", "false_positives", "false_negatives"}, ...]`.
    """
    rows = []
    for image in images:
        gt_of_pred, count = _same_class_matches(image, iou, score)
        matched = int((gt_of_pred >= 0).sum())
        rows.append({"image_id": int(image.image_id), "false_positives": len(gt_of_pred) - matched,
                     "false_negatives": count - matched})
    return sorted(rows, key=lambda r: (-(r["false_positives"] + r["false_negatives"]), r["image_id"]))


# --- query slots (Fig. 7) ---


def slot_boxes(images: Sequence[ImageAnalysis], min_score: float = 0.0) -> dict[str, Any]:
    """For each query slot, its final box (cx, cy, w, h, normalised) in every image where its score >= `min_score`.

    DETR's slots learn to specialise in regions and box shapes (paper Fig. 7); these points, plotted per slot,
    show it. `{"slots": Q, "boxes": {q: [[cx, cy, w, h], ...]}}` with an entry, maybe empty, for every slot
    0..Q-1 (int keys; `json.dump` writes them as strings). The values are the input's, unchanged.
    """
    slots = max((len(image.slot_boxes) for image in images), default=0)
    boxes: dict[int, list[list[float]]] = {q: [] for q in range(slots)}
    for image in images:
        scores = np.asarray(image.slot_scores).reshape(-1).tolist()
        for q, (box, slot_score) in enumerate(zip(np.asarray(image.slot_boxes).reshape(-1, 4).tolist(), scores)):
            if slot_score >= min_score:
                boxes[q].append(box)
    return {"slots": slots, "boxes": boxes}
