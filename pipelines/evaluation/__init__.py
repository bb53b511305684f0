"""Evaluation with Ray Data: model actors predict on a labelled dataset, the driver scores the predictions.

`score_detection` (COCO box AP with pycocotools) and `score_panoptic` (PQ with
torchmetrics against the panoptic PNGs, mask AP of things with pycocotools) take
a dataset from `pipelines.training.dataset.build_detection_dataset` and the
model (a checkpoint's bytes or an export's package, or its object-store reference); `report` writes the per-class
table and precision-recall plot that the evaluation job logs.
"""
