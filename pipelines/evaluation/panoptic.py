"""Panoptic quality and mask AP of a model with masks on a COCO panoptic dataset.

`PanopticEvalPredictor` actors predict at each image's original size; the driver
reads each image's ground-truth PNG from the source and scores PQ (torchmetrics)
and mask AP of the things (pycocotools, instances cut from the ground truth)."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING

from detr.panoptic_evaluation import PANOPTIC_STAT_NAMES, PanopticEvaluator, instance_ground_truth, mask_ap
from pipelines.evaluation.predictors import PanopticEvalPredictor
from pipelines.evaluation.scores import Scores, rejected_line
from pipelines.sources import Source, iter_records
from pipelines.storage import read_bytes
from pipelines.validation.panoptic import decode_panoptic_png, panoptic_categories

if TYPE_CHECKING:
    import ray

    from pipelines.inference.export_package import ExportPackage


def score_panoptic(dataset, source: Source, model: "bytes | ExportPackage | ray.ObjectRef", threshold: float, *,
                   batch_size: int = 4, concurrency: int = 1, runtime: str = "torch") -> Scores:
    """`dataset`: evaluation samples of the panoptic `source`; `threshold`: the panoptic merge's (queries
    whose top probability exceeds it make segments)."""
    from ray.data import ActorPoolStrategy

    categories = source.categories or []
    is_thing = panoptic_categories(categories)
    predictions = dataset.dataset.map_batches(
        PanopticEvalPredictor,
        fn_constructor_kwargs={"model": model, "is_thing": is_thing, "threshold": threshold,
                               "runtime": runtime},
        batch_size=batch_size, batch_format="numpy", compute=ActorPoolStrategy(size=concurrency), num_cpus=1)
    records = {int(r["image_id"]): r for r in iter_records(source)}
    evaluator = PanopticEvaluator(categories)
    images, annotations, results = [], [], []
    for row in predictions.iter_rows():
        image_id = int(row["image_id"])
        record = records[image_id]
        gt_ids = decode_panoptic_png(read_bytes(record["panoptic_path"]), record["panoptic_path"])
        gt_segments = [{"id": int(a), "category_id": int(c), "iscrowd": int(k)} for a, c, k in
                       zip(record["annotation_ids"], record["category_ids"], record["iscrowd"])]
        evaluator.update(decode_panoptic_png(bytes(row["panoptic_png"])), json.loads(str(row["segments_info"])),
                         gt_ids, gt_segments)
        images.append({"id": image_id, "height": int(gt_ids.shape[0]), "width": int(gt_ids.shape[1])})
        annotations += instance_ground_truth(image_id, gt_ids, gt_segments, is_thing, len(annotations) + 1)
        results += [{**r, "image_id": image_id} for r in json.loads(str(row["mask_results"]))]
    stats = evaluator.compute()
    things = [c for c in categories if is_thing.get(int(c["id"]), True)]
    segm = mask_ap({"images": images, "annotations": annotations, "categories": things}, results)
    metrics = {name: float(stats[name]) for name in PANOPTIC_STAT_NAMES}
    metrics.update({k: float(v) for k, v in segm.items() if k.startswith("segm_")})
    per_class = {cat: {**values, "mask_AP": segm["per_class"].get(cat, float("nan"))}
                 for cat, values in stats["per_class"].items()}
    return Scores(metrics, per_class, len(images), rejected=rejected_line(dataset))
