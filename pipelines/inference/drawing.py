"""Drawing detections on images (torchvision's `draw_bounding_boxes`) for PNG previews."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes

from detr.postprocess import Detections

PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324")


def class_colour(category_id: int) -> str:
    """The colour of a class in every picture (previews, evaluation plots): the one its boxes are drawn in."""
    return PALETTE[int(category_id) % len(PALETTE)]


def draw_detections(
    image: np.ndarray,
    detections: Detections,
    label_name: Callable[[int], str] = str,
    score_threshold: float = 0.5,
) -> Image.Image:
    """An RGB PIL image of `image` (HWC uint8) with the detections above `score_threshold` drawn."""
    keep = detections["scores"] > score_threshold
    boxes = detections["boxes"][keep].float()
    labels = detections["labels"][keep].tolist()
    scores = detections["scores"][keep].tolist()
    canvas = torch.tensor(np.asarray(image, dtype=np.uint8)).permute(2, 0, 1)
    if len(boxes):
        h, w = image.shape[:2]
        boxes = boxes.clone()
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w - 1)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h - 1)
        canvas = draw_bounding_boxes(
            canvas,
            boxes,
            labels=[f"{label_name(label)} {score:.2f}" for label, score in zip(labels, scores)],
            colors=[class_colour(label) for label in labels],
            width=max(1, min(image.shape[:2]) // 150),
        )
    return Image.fromarray(canvas.permute(1, 2, 0).numpy())
