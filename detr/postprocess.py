"""From raw model outputs to detections in pixel coordinates.

Scores are the softmax probabilities without the no-object class (or, for a
model trained with the focal loss, `sigmoid=True`: see `scored_by_sigmoid`,
the sigmoid of each real class's logit). A softmax query's label is its most
probable real class, as in the official code. Sigmoid scores are independent per
class, so, as Deformable DETR and its successors do, a detection is a (query,
class) pair: the best `max_detections` pairs over all queries and classes, so a
query unsure between two classes is kept under both (COCO AP counts the right one;
per-query argmax would lose it whenever the wrong class scores a little higher).
Boxes go from normalised (cx, cy, w, h) to absolute (x0, y0, x1, y1) in each
image's target size, given as (height, width). Without options every query (or
pair) is returned, as COCO evaluation wants; `score_threshold` and `top_k` trim
the list for labelling and display.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert

from .errors import RaydetrError

Detections = dict[str, Tensor]
"""Per image: "scores" [N] float, "labels" [N] int64, "boxes" [N,4] float xyxy in pixels."""


def _as_size_tensor(target_sizes: Tensor | Sequence[Sequence[int]], device: torch.device) -> Tensor:
    sizes = torch.as_tensor(target_sizes, device=device)
    if sizes.ndim != 2 or sizes.shape[1] != 2:
        raise ValueError(f"target_sizes must be [B, 2] (height, width) pairs, got shape {tuple(sizes.shape)}")
    return sizes


def scored_by_sigmoid(config: Any) -> bool:
    """Whether a model's classes are scored by sigmoids (trained with the focal loss) rather than a softmax:
    what every post-processing of its outputs is told (`sigmoid=`)."""
    return getattr(config, "focal", None) is not None


SOFTMAX_SCORE_THRESHOLD = 0.5
SIGMOID_SCORE_THRESHOLD = 0.2
"""Default thresholds for keeping a detection. A sigmoid score (a model trained with the focal loss) is one
class's own probability, not a share of one softmax with "no object", and runs lower for the same detection:
the fast recipe's models keep almost nothing at 0.5 (what a newcomer met), and label well at 0.2."""


def default_score_threshold(config: Any) -> float:
    """The score above which a model's detections are kept unless a job says otherwise."""
    return SIGMOID_SCORE_THRESHOLD if scored_by_sigmoid(config) else SOFTMAX_SCORE_THRESHOLD


def class_probabilities(outputs: Mapping[str, Tensor], sigmoid: bool = False) -> Tensor:
    """[B, Q, num_classes] probabilities of the real classes: the softmax without "no object", or for
    a model trained with the focal loss (`sigmoid`) the sigmoids."""
    logits = outputs["pred_logits"].float()
    if sigmoid:
        return logits[..., :-1].sigmoid()
    return F.softmax(logits, -1)[..., :-1]


class PostProcess(nn.Module):
    """Turns `pred_logits`/`pred_boxes` into per-image scores, labels and pixel xyxy boxes."""

    def __init__(self, score_threshold: float | None = None, top_k: int | None = None,
                 max_detections: int = 100, sigmoid: bool = False) -> None:
        super().__init__()
        self.sigmoid = sigmoid
        if top_k is not None and top_k < 1:
            raise RaydetrError(f"top_k must be >= 1, got {top_k}")
        if max_detections < 1:
            raise RaydetrError(f"max_detections must be >= 1, got {max_detections}")
        self.score_threshold = score_threshold
        self.top_k = top_k
        self.max_detections = max_detections  # (query, class) pairs kept per image, sigmoid scores only

    @torch.no_grad()
    def forward(self, outputs: Mapping[str, Tensor], target_sizes: Tensor | Sequence[Sequence[int]]) -> list[Detections]:
        """`target_sizes`: [B, 2] of (height, width), the size to express boxes in for each image
        (the original image size for evaluation)."""
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        sizes = _as_size_tensor(target_sizes, logits.device)
        if len(sizes) != len(logits):
            raise ValueError(f"{len(sizes)} target sizes for a batch of {len(logits)} images")
        prob = class_probabilities(outputs, self.sigmoid)
        if self.sigmoid:
            classes = prob.shape[-1]
            scores, pairs = prob.flatten(1).topk(min(self.max_detections, prob.shape[1] * classes), dim=1)
            labels = pairs % classes
            boxes = boxes.gather(1, (pairs // classes)[..., None].expand(-1, -1, 4))
        else:
            scores, labels = prob.max(-1)
        img_h, img_w = sizes.unbind(1)
        scale = torch.stack([img_w, img_h, img_w, img_h], dim=1).to(prob)
        boxes = box_convert(boxes.float(), "cxcywh", "xyxy") * scale[:, None, :]
        return [self._select(s, l, b) for s, l, b in zip(scores, labels, boxes)]

    def _select(self, scores: Tensor, labels: Tensor, boxes: Tensor) -> Detections:
        if self.top_k is not None or self.score_threshold is not None:
            order = scores.argsort(descending=True)
            if self.top_k is not None:
                order = order[: self.top_k]
            if self.score_threshold is not None:
                order = order[scores[order] > self.score_threshold]
            scores, labels, boxes = scores[order], labels[order], boxes[order]
        return {"scores": scores, "labels": labels, "boxes": boxes}
