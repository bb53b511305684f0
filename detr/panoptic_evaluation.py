"""Panoptic quality (PQ, SQ, RQ) with torchmetrics, and mask AP for things with pycocotools.

`PanopticEvaluator` feeds each image's predicted and ground-truth segmentations
(segment-id maps with their `segments_info`, at the same size) to torchmetrics'
`PanopticQuality`, which matches segments (IoU > 0.5) and accumulates, per
category, the IoU sum and the true positive, false positive and false negative
counts. From those counts it reports PQ = sum IoU / (TP + FP/2 + FN/2) = SQ x RQ
per class, and their means over the classes that occur (TP + FP + FN > 0), as
the COCO panoptic API does: over all classes, things (`_th`) and stuff (`_st`).

Unlabelled ground truth (id 0, and crowd segments) is void: it matches nothing,
and a predicted segment lying mostly on it is no false positive (the COCO API's
rule). Predicted pixels of no segment are not void, unlike torchmetrics' default,
which would excuse a ground-truth segment the prediction leaves mostly empty:
they get a category of their own (`unlabelled`, left out of every average), so
a missed segment is a false negative, as in the COCO API.

`mask_ap` scores instance masks of things (COCO RLE) with `COCOeval(iouType="segm")`.
"""
from __future__ import annotations

import contextlib
import io
from typing import Any, Mapping, Sequence

import numpy as np
import torch

IGNORED = -1
"""The category id given to pixels that count for nothing (void, crowd)."""
PANOPTIC_STAT_NAMES = ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st")
"""The overall numbers `PanopticEvaluator.compute` reports (and the jobs log)."""


def _category_pairs(id_map: Any, segments_info: Sequence[Mapping[str, Any]], skip_crowd: bool) -> torch.Tensor:
    """[H, W] segment ids + segments_info -> [H, W, 2] (category id, segment id); IGNORED elsewhere."""
    ids = torch.as_tensor(np.asarray(id_map.cpu() if torch.is_tensor(id_map) else id_map), dtype=torch.long)
    category = torch.full_like(ids, IGNORED)
    instance = torch.zeros_like(ids)
    if segments_info:
        seg_ids = torch.tensor([int(s["id"]) for s in segments_info])
        cats = torch.tensor([IGNORED if (skip_crowd and s.get("iscrowd", 0)) else int(s["category_id"])
                             for s in segments_info])
        flat = ids.flatten()
        order = seg_ids.argsort()
        pos = torch.searchsorted(seg_ids[order], flat).clamp(max=len(seg_ids) - 1)
        hit = seg_ids[order][pos] == flat
        category = torch.where(hit, cats[order][pos], torch.full_like(flat, IGNORED)).view(ids.shape)
        instance = torch.where(hit, flat, torch.zeros_like(flat)).view(ids.shape)
    return torch.stack([category, instance], dim=-1)


class PanopticEvaluator:
    """Accumulates PQ over images; `categories` are COCO panoptic categories (`id`, `isthing`, `name`)."""

    def __init__(self, categories: Sequence[Mapping[str, Any]]):
        from torchmetrics.detection import PanopticQuality

        self.categories = [dict(c) for c in categories]
        self.things = sorted(int(c["id"]) for c in categories if c.get("isthing", 1))
        self.stuff = sorted(int(c["id"]) for c in categories if not c.get("isthing", 1))
        if not self.things and not self.stuff:
            raise ValueError("PanopticEvaluator needs at least one category")
        # torchmetrics orders its per-class states: things (sorted), then stuff (sorted); the
        # `unlabelled` prediction class has the largest id, so it comes last and is left out.
        self.order = self.things + self.stuff
        self.unlabelled = max(self.order) + 1
        self.metric = PanopticQuality(things=set(self.things), stuffs=set(self.stuff) | {self.unlabelled},
                                      allow_unknown_preds_category=True)
        self.images = 0

    def update(self, pred_id_map: Any, pred_segments: Sequence[Mapping[str, Any]], gt_id_map: Any,
               gt_segments: Sequence[Mapping[str, Any]]) -> None:
        """One image: predicted and ground-truth segment-id maps of the same size, with their segments."""
        pred = _category_pairs(pred_id_map, pred_segments, skip_crowd=False)
        target = _category_pairs(gt_id_map, gt_segments, skip_crowd=True)
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape[:2])} and ground truth {tuple(target.shape[:2])} "
                             "must have the same size")
        unknown_pred = ~torch.isin(pred[..., 0], torch.tensor(self.order))
        pred[..., 0][unknown_pred] = self.unlabelled  # no segment, or a class outside the table
        pred[..., 1][unknown_pred] = 0
        self.metric.update(pred[None], target[None])
        self.images += 1

    def counts(self) -> torch.Tensor:
        """The accumulated state, [4, classes] float64 (IoU sum, TP, FP, FN): sum it over workers that
        each saw part of the images, then `set_counts`, and `compute` scores all of them."""
        m = self.metric
        return torch.stack([m.iou_sum.double(), m.true_positives.double(), m.false_positives.double(),
                            m.false_negatives.double()])

    def set_counts(self, counts: torch.Tensor) -> None:
        m = self.metric
        for state, values in zip((m.iou_sum, m.true_positives, m.false_positives, m.false_negatives), counts):
            state.copy_(values.to(state.dtype))

    def compute(self) -> dict[str, Any]:
        """PQ, SQ, RQ overall and for things/stuff (means over classes that occur), `per_class`
        {category id: {"PQ", "SQ", "RQ", "TP", "FP", "FN"}}, and `num_images`."""
        m = self.metric
        n = len(self.order)
        iou = m.iou_sum.double()[:n]
        tp, fp, fn = m.true_positives.double()[:n], m.false_positives.double()[:n], m.false_negatives.double()[:n]
        sq = torch.where(tp > 0, iou / tp.clamp(min=1), torch.zeros_like(iou))
        denominator = tp + 0.5 * fp + 0.5 * fn
        rq = torch.where(denominator > 0, tp / denominator.clamp(min=1e-12), torch.zeros_like(iou))
        pq = sq * rq
        occurs = denominator > 0
        per_class = {
            cat: {"PQ": float(pq[i]), "SQ": float(sq[i]), "RQ": float(rq[i]), "TP": int(tp[i]), "FP": int(fp[i]),
                  "FN": int(fn[i])}
            for i, cat in enumerate(self.order) if bool(occurs[i])
        }
        result: dict[str, Any] = {}
        groups = {"": self.order, "_th": self.things, "_st": self.stuff}
        for suffix, cats in groups.items():
            idx = torch.tensor([self.order.index(c) for c in cats if bool(occurs[self.order.index(c)])], dtype=torch.long)
            for name, values in (("PQ", pq), ("SQ", sq), ("RQ", rq)):
                result[name + suffix] = float(values[idx].mean()) if len(idx) else float("nan")
            result["classes" + suffix] = int(len(idx))
        result["per_class"] = per_class
        result["num_images"] = self.images
        return result


def panoptic_target(masks: Any, labels: Any) -> tuple[np.ndarray, list[dict[str, int]]]:
    """A sample's instance masks [N, H, W] and labels [N] as a panoptic ground truth: a segment-id map
    (segment k + 1 where mask k is set, later masks over earlier ones, 0 elsewhere) and its segments."""
    masks = np.asarray(masks.cpu() if torch.is_tensor(masks) else masks, dtype=bool)
    labels = labels.tolist() if hasattr(labels, "tolist") else list(labels)
    id_map = np.zeros(masks.shape[1:], dtype=np.int64)
    for k, mask in enumerate(masks, start=1):
        id_map[mask] = k
    return id_map, [{"id": k, "category_id": int(c)} for k, c in enumerate(labels, start=1)]


def mask_ap(ground_truth: Mapping[str, Any], results: Sequence[Mapping[str, Any]],
            image_ids: Sequence[int] | None = None) -> dict[str, Any]:
    """COCO mask AP: `ground_truth` a COCO dict whose annotations have RLE `segmentation` (things only),
    `results` COCO results with `segmentation` (RLE, counts as str), `category_id`, `score`, `image_id`.
    Returns the 12 stats (`segm_AP`, `segm_AP50`, ...) and `per_class` AP."""
    from pycocotools.cocoeval import COCOeval

    from .evaluation import STAT_NAMES, load_coco

    coco = load_coco(ground_truth)
    ids = sorted(int(i) for i in (image_ids if image_ids is not None else [im["id"] for im in ground_truth["images"]]))
    stats = {f"segm_{name}": 0.0 for name in STAT_NAMES}
    per_class: dict[int, float] = {}
    results = [r for r in results if int(r["image_id"]) in set(ids)]
    if ids and results and ground_truth.get("annotations"):
        with contextlib.redirect_stdout(io.StringIO()):
            detections = coco.loadRes([dict(r) for r in results])
            evaluator = COCOeval(coco, detections, "segm")
            evaluator.params.imgIds = ids
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        stats = {f"segm_{name}": float(v) for name, v in zip(STAT_NAMES, evaluator.stats)}
        precision = evaluator.eval["precision"]
        for k, cat_id in enumerate(evaluator.params.catIds):
            p = precision[:, :, k, 0, -1]
            per_class[int(cat_id)] = float(np.mean(p[p > -1])) if (p > -1).any() else float("nan")
    return {**stats, "per_class": per_class}


def instance_ground_truth(image_id: int, id_map: Any, segments_info: Sequence[Mapping[str, Any]],
                          is_thing: Mapping[int, bool], first_annotation_id: int = 1) -> list[dict[str, Any]]:
    """COCO instance annotations (RLE masks) for the thing segments of one panoptic ground truth."""
    from .panoptic import masks_to_rle

    ids = np.asarray(id_map.cpu() if torch.is_tensor(id_map) else id_map)
    things = [s for s in segments_info if is_thing.get(int(s["category_id"]), True)]
    if not things:
        return []
    masks = np.stack([ids == int(s["id"]) for s in things])
    annotations = []
    for k, (s, rle, mask) in enumerate(zip(things, masks_to_rle(masks), masks)):
        ys, xs = np.nonzero(mask)
        bbox = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)] \
            if len(xs) else [0.0, 0.0, 0.0, 0.0]
        annotations.append({"id": first_annotation_id + k, "image_id": int(image_id),
                            "category_id": int(s["category_id"]), "segmentation": rle, "area": float(mask.sum()),
                            "bbox": bbox, "iscrowd": int(s.get("iscrowd", 0))})
    return annotations


__all__ = ["IGNORED", "PANOPTIC_STAT_NAMES", "PanopticEvaluator", "instance_ground_truth", "mask_ap",
           "panoptic_target"]
