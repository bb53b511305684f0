"""COCO box AP of a detector on a labelled dataset: `EvalPredictor` actors predict, pycocotools scores."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from detr.evaluation import STAT_NAMES, coco_ground_truth, evaluate_coco
from pipelines.evaluation.predictors import EvalPredictor
from pipelines.evaluation.scores import Scores, rejected_line

if TYPE_CHECKING:
    import ray

    from pipelines.inference.export_package import ExportPackage


def score_detection(dataset, model: "bytes | ExportPackage | ray.ObjectRef", categories: Sequence[dict], *,
                    batch_size: int = 4, concurrency: int = 1, runtime: str = "torch") -> Scores:
    """`dataset`: a `DetectionDataset` of evaluation samples (`build_detection_dataset(train=False)` with
    the model's transforms); `model`: the checkpoint's bytes or an export's package, or its object-store reference."""
    from ray.data import ActorPoolStrategy

    predictions = dataset.dataset.map_batches(
        EvalPredictor, fn_constructor_kwargs={"model": model, "runtime": runtime}, batch_size=batch_size,
        batch_format="numpy", compute=ActorPoolStrategy(size=concurrency), num_cpus=1)
    detections, targets = {}, []
    for row in predictions.iter_rows():
        image_id = int(row["image_id"])
        detections[image_id] = {name: torch.from_numpy(np.array(row[f"det_{name}"]))
                                for name in ("boxes", "scores", "labels")}
        targets.append({"image_id": image_id, "orig_size": row["orig_size"], "size": row["size"],
                        "boxes": row["gt_boxes"], "labels": row["gt_labels"], "area": row["area"],
                        "iscrowd": row["iscrowd"]})
    ground_truth = coco_ground_truth(targets, categories)
    stats = evaluate_coco(ground_truth, detections, image_ids=[im["id"] for im in ground_truth["images"]])
    return Scores({name: float(stats[name]) for name in STAT_NAMES},
                  {cat: {"AP": ap} for cat, ap in stats["per_class"].items()}, len(ground_truth["images"]),
                  pr_curves=stats["pr_curves"], rejected=rejected_line(dataset))
