"""Hungarian matching between predictions and ground-truth objects.

Each target object gets exactly one prediction, chosen to minimise
`cost_class * (-p(class)) + cost_bbox * L1(boxes) + cost_giou * (-GIoU(boxes))`
with `scipy.optimize.linear_sum_assignment`. With `focal=(alpha, gamma)` the class
cost is Deformable DETR's focal cost instead: the focal loss of calling the
prediction the target's class minus that of calling it background, on sigmoid
probabilities, so that matching ranks predictions as the focal loss scores them. The cost matrix is computed for the
whole batch at once and split per image; images without targets match nothing.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou

MatchIndices = list[tuple[Tensor, Tensor]]
"""Per image: (prediction indices, target indices), both int64, same length."""


def focal_class_cost(logits: Tensor, alpha: float, gamma: float) -> Tensor:
    """Focal loss of each logit as a positive minus its focal loss as a negative (elementwise)."""
    prob = logits.sigmoid()
    positive = alpha * (1 - prob) ** gamma * F.softplus(-logits)  # -log(p) = softplus(-x)
    negative = (1 - alpha) * prob**gamma * F.softplus(logits)  # -log(1 - p) = softplus(x)
    return positive - negative


class HungarianMatcher(nn.Module):
    """Optimal one-to-one assignment of predictions to targets (the paper's bipartite matching)."""

    def __init__(
        self,
        cost_class: float = 1.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal: tuple[float, float] | None = None,
    ) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("the matcher costs cannot all be 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal = focal

    @torch.no_grad()
    def cost_matrix(self, outputs: Mapping[str, Tensor], targets: Sequence[Mapping[str, Tensor]]) -> Tensor:
        """Matching cost [B, Q, total number of targets in the batch]."""
        bs, num_queries = outputs["pred_logits"].shape[:2]
        logits = outputs["pred_logits"].flatten(0, 1).float()
        out_bbox = outputs["pred_boxes"].flatten(0, 1).float()
        tgt_ids = torch.cat([t["labels"] for t in targets]).long()
        tgt_bbox = torch.cat([t["boxes"] for t in targets]).to(out_bbox)
        if self.focal is None:
            # 1 - p(class) approximates the NLL; the constant 1 does not change the assignment.
            cost_class = -logits.softmax(-1)[:, tgt_ids]
        else:
            cost_class = focal_class_cost(logits[:, tgt_ids], *self.focal)
        cost_bbox = torch.cdist(out_bbox, tgt_bbox, p=1)
        cost_giou = -generalized_box_iou(
            box_convert(out_bbox, "cxcywh", "xyxy"), box_convert(tgt_bbox, "cxcywh", "xyxy")
        )
        cost = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        return cost.view(bs, num_queries, -1)

    @torch.no_grad()
    def forward(self, outputs: Mapping[str, Tensor], targets: Sequence[Mapping[str, Tensor]]) -> MatchIndices:
        """Match `outputs` ("pred_logits" [B,Q,K+1], "pred_boxes" [B,Q,4]) to `targets`
        (per image "labels" [N] and "boxes" [N,4] normalised cxcywh).

        Returns, per image, (prediction indices, target indices) with min(Q, N) pairs.
        """
        if len(targets) != outputs["pred_logits"].shape[0]:
            raise ValueError(f"{len(targets)} targets for a batch of {outputs['pred_logits'].shape[0]} images")
        cost = self.cost_matrix(outputs, targets).cpu()
        if not torch.isfinite(cost).all():
            raise FloatingPointError(
                "the matching cost contains NaN or inf: the model's outputs or the target boxes are not finite"
            )
        # Imported here: inference never matches, and scipy takes 0.5 s to import.
        from scipy.optimize import linear_sum_assignment

        sizes = [len(t["boxes"]) for t in targets]
        indices = []
        for i, c in enumerate(cost.split(sizes, -1)):
            rows, cols = linear_sum_assignment(c[i].numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices
