"""What an evaluation measured, before the job logs it."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Scores:
    metrics: dict[str, float]
    """The overall numbers: COCO's twelve (`AP`, `AP50`, ...), or PQ/SQ/RQ and `segm_*` mask AP."""
    per_class: dict[int, dict[str, float]]
    """Category id -> its numbers (`AP`; or `PQ`, `SQ`, `RQ`, `TP`, `FP`, `FN`, `mask_AP`)."""
    images: int
    pr_curves: dict[int, list[float]] = field(default_factory=dict)
    """Detection: precision at 101 recall points (IoU 0.5) per category, for the plot."""
    rejected: str | None = None
    """What validation rejected (not evaluated), as one line; None when nothing was."""
    analysis: list | None = None
    """Detection with analysis: each image's `pipelines.evaluation.analysis.ImageAnalysis`, by image id."""


def rejected_line(dataset) -> str | None:
    """The records a `DetectionDataset`'s validation rejected, as one line (None: none)."""
    if dataset.errors is None:
        return None
    rejected = dataset.errors.errors()
    if not rejected:
        return None
    return f"{len(rejected)} records rejected by validation (not evaluated): {dataset.errors.summary().format()}"
