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

    from pipelines.evaluation.analysis import ImageAnalysis
    from pipelines.inference.export_package import ExportPackage


def score_detection(dataset, model: "bytes | ExportPackage | ray.ObjectRef", categories: Sequence[dict], *,
                    batch_size: int = 4, concurrency: int = 1, runtime: str = "torch",
                    analysis: bool = False) -> Scores:
    """`dataset`: a `DetectionDataset` of evaluation samples (`build_detection_dataset(train=False)` with
    the model's transforms); `model`: the checkpoint's bytes or an export's package, or its object-store
    reference. With `analysis`, `Scores.analysis` holds what each image contributes to the paper's analyses
    (`pipelines.evaluation.analysis.ImageAnalysis`)."""
    from ray.data import ActorPoolStrategy

    predictions = dataset.dataset.map_batches(
        EvalPredictor, fn_constructor_kwargs={"model": model, "runtime": runtime, "analysis": analysis},
        batch_size=batch_size, batch_format="numpy", compute=ActorPoolStrategy(size=concurrency), num_cpus=1)
    detections, targets, analysed = {}, [], {}
    for row in predictions.iter_rows():
        image_id = int(row["image_id"])
        detections[image_id] = {name: torch.from_numpy(np.array(row[f"det_{name}"]))
                                for name in ("boxes", "scores", "labels")}
        targets.append({"image_id": image_id, "orig_size": row["orig_size"], "size": row["size"],
                        "boxes": row["gt_boxes"], "labels": row["gt_labels"], "area": row["area"],
                        "iscrowd": row["iscrowd"]})
        if analysis:
            analysed[image_id] = image_analysis(row)
    ground_truth = coco_ground_truth(targets, categories)
    stats = evaluate_coco(ground_truth, detections, image_ids=[im["id"] for im in ground_truth["images"]])
    return Scores({name: float(stats[name]) for name in STAT_NAMES},
                  {cat: {"AP": ap} for cat, ap in stats["per_class"].items()}, len(ground_truth["images"]),
                  pr_curves=stats["pr_curves"], rejected=rejected_line(dataset),
                  analysis=[analysed[i] for i in sorted(analysed)] if analysis else None)


def image_analysis(row: dict) -> "ImageAnalysis":
    """An `EvalPredictor` row with `analysis` as one image's `ImageAnalysis` (crowd boxes left out; ground
    truth from normalised cx, cy, w, h to corners in original pixels)."""
    from torchvision.ops import box_convert

    from pipelines.evaluation.analysis import ImageAnalysis

    height, width = (int(v) for v in np.asarray(row["orig_size"]).reshape(2))
    boxes = torch.as_tensor(np.asarray(row["gt_boxes"], dtype=np.float64).reshape(-1, 4))
    boxes = box_convert(boxes * torch.tensor([width, height, width, height], dtype=torch.float64), "cxcywh", "xyxy")
    keep = np.asarray(row["iscrowd"]).reshape(-1) == 0
    scores, labels, layer_boxes = (np.asarray(row[f"layer_{n}"]) for n in ("scores", "labels", "boxes"))
    layers = [{"boxes": layer_boxes[i], "scores": scores[i], "labels": labels[i]} for i in range(len(scores))]
    return ImageAnalysis(int(row["image_id"]), (height, width), boxes.numpy()[keep],
                         np.asarray(row["gt_labels"]).reshape(-1)[keep], layers, np.asarray(row["slot_boxes"]),
                         np.asarray(row["slot_scores"]))
