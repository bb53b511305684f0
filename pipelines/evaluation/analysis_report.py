"""The evaluation's analysis folder: the paper's pictures of a detector and the numbers behind each.

    per_layer_ap.png             AP and AP50 after each decoder layer, with and without NMS (Fig. 4)
    slot_boxes.png / .parquet    the box each query slot predicts on every image (Fig. 7)
    missed_by_instance_count.png instances missed against instances of the class per image (Fig. 12)
    confusion_matrix.png         true against predicted class, with background, at IoU 0.5 and the score threshold
    worst_images.png             the images with the most false positives plus false negatives, boxes drawn
    analysis.json                every number the PNGs show (slot boxes: the Parquet file)

Why a folder of files: the numbers let a test (or a user's notebook) check what a picture shows, and the
evaluation job logs the folder to its MLflow run. A picture that cannot be drawn is skipped with the reason
(an evaluation with no images; per-layer AP of a model without per-layer outputs).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from pipelines.evaluation import analysis as A
from pipelines.evaluation import analysis_plots as P

IOU = 0.5
"""Where a prediction matches a ground-truth box (the confusion matrix, misses, the worst images)."""
WORST_IMAGES = 8


@dataclass
class AnalysisReport:
    files: dict[str, str] = field(default_factory=dict)
    """Name -> path of each file written."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Name -> why that picture was not drawn."""


def _finite(value: Any) -> Any:
    """NaN (AP where nothing could be scored) as JSON's null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def write_analysis_report(images: Sequence[A.ImageAnalysis], categories: Sequence[Mapping[str, Any]], source,
                          folder: str, score_threshold: float = 0.5, learned_slots: bool = True,
                          refined_boxes: bool = False) -> AnalysisReport:
    """Compute every analysis of `images` (from `score_detection(..., analysis=True)`), draw it into `folder`
    (created), and write the numbers; `source` is the evaluated `pipelines.sources.Source`, read again only
    for the worst images. `learned_slots`: the queries are learned slots (False: a two-stage model's
    proposals, ranked by score, whose "slot" is a rank). `refined_boxes`: the model's last per-layer output is
    its box refiner's (`detr.roi_refine`)."""
    os.makedirs(folder, exist_ok=True)
    report = AnalysisReport()
    if not images:
        report.skipped = {name: "no image was evaluated" for name in
                          ("per_layer_ap", "slot_boxes", "missed_by_instance_count", "confusion_matrix",
                           "worst_images")}
        return report
    numbers: dict[str, Any] = {"iou": IOU, "score_threshold": score_threshold,
                               "queries": "learned slots" if learned_slots else "proposals ranked by score"}

    def path(name: str) -> str:
        report.files[name] = os.path.join(folder, name)
        return report.files[name]

    if len(images[0].layers) > 1:
        numbers["per_layer_ap"] = A.per_layer_ap(images, categories, refined=int(refined_boxes))
        P.plot_per_layer_ap(numbers["per_layer_ap"], path("per_layer_ap.png"))
    else:
        report.skipped["per_layer_ap"] = ("the model gives its last decoder layer's outputs only (aux_loss off, "
                                          "or an exported graph): nothing to compare layer by layer")
    slots = A.slot_boxes(images)
    P.plot_slot_boxes(slots, path("slot_boxes.png"), name="slot" if learned_slots else "proposal rank")
    _write_slot_table(slots, path("slot_boxes.parquet"))
    numbers["missed_by_instance_count"] = A.missed_by_instance_count(images, categories, IOU, score_threshold)
    P.plot_missed_by_instance_count(numbers["missed_by_instance_count"], categories,
                                    path("missed_by_instance_count.png"))
    numbers["confusion_matrix"] = A.confusion_matrix(images, categories, IOU, score_threshold)
    P.plot_confusion_matrix(numbers["confusion_matrix"], path("confusion_matrix.png"))
    worst = [row for row in A.error_counts(images, IOU, score_threshold) if
             row["false_positives"] + row["false_negatives"]][:WORST_IMAGES]
    numbers["worst_images"] = worst
    if worst:
        P.draw_error_grid(_error_entries(worst, images, source), path("worst_images.png"), min_score=score_threshold)
    else:
        report.skipped["worst_images"] = "no image has a false positive or a false negative"
    with open(path("analysis.json"), "w") as f:
        json.dump(_finite(numbers), f, indent=1)
    return report


def _write_slot_table(slots: Mapping[str, Any], path: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [(int(q), *box) for q, boxes in slots["boxes"].items() for box in boxes]
    columns = list(zip(*rows)) if rows else [[], [], [], [], []]
    pq.write_table(pa.table({name: pa.array(values, pa.int32() if name == "slot" else pa.float32())
                             for name, values in zip(("slot", "cx", "cy", "w", "h"), columns)}), path)


def _error_entries(worst: list[dict], images: Sequence[A.ImageAnalysis], source) -> list[tuple]:
    """The worst images read again from the source (decoded as evaluation decoded them), with their boxes."""
    from pipelines.sources import iter_records
    from pipelines.validation.decode import decode_image
    from pipelines.validation.errors import PipelineError
    from pipelines.validation.loading import read_record_bytes

    wanted = {row["image_id"]: row for row in worst}
    by_id = {image.image_id: image for image in images}
    pictures: dict[int, np.ndarray] = {}
    for record in iter_records(source):
        image_id = int(record.get("image_id", -1))
        if image_id not in wanted or image_id in pictures:
            continue
        try:
            pictures[image_id] = decode_image(read_record_bytes(record), str(record.get("key", ""))).array
        except PipelineError:  # unreadable now: its place in the grid stays empty
            continue
        if len(pictures) == len(wanted):
            break
    entries = []
    for image_id, row in wanted.items():
        if image_id not in pictures:
            continue
        image, last = by_id[image_id], by_id[image_id].layers[-1]
        entries.append((pictures[image_id], image.gt_boxes, image.gt_labels, np.asarray(last["boxes"]),
                        np.asarray(last["scores"]), np.asarray(last["labels"]),
                        f"{image_id}: {row['false_positives']} FP, {row['false_negatives']} FN"))
    return entries


__all__ = ["AnalysisReport", "write_analysis_report"]
