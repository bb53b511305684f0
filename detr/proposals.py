"""Two-stage queries (`DETRConfig.two_stage`): the dense head's best cells start the decoder.

The best `num_queries` cells by class score become the queries: their boxes, through a sine embedding
and a small MLP (`query_pos`), the positional queries; their content zeros or (`content`) the cells'
own encoder features. The decoder then predicts boxes relative to these references. With `nms`,
cells that overlap a better cell are passed over, so each query starts on its own object.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms, box_convert

from .heads import MLP
from .position_encoding import box_sine_embedding

SURVIVOR_BONUS = 1e6
"""Added to the scores of cells that survive proposal NMS, to rank them above every other cell."""


def select_proposals(scores: Tensor, boxes: Tensor, valid: Tensor, count: int, nms_iou: float = 0.0,
                     classes: Tensor | None = None) -> Tensor:
    """Indices [B, count] of the best cells by `scores` [B, N] (boxes [B, N, 4] cxcywh; `valid` [B, N]
    False on padding, whose scores are already at the bottom), best first. With `nms_iou` > 0, cells
    suppressed by a better cell's box (NMS among the valid cells; per class when `classes` [B, N]
    is given, else class-agnostic) come only after every surviving cell, so they fill the queries
    only when too few survive."""
    if nms_iou <= 0:
        return scores.topk(count, dim=1).indices
    xyxy = box_convert(boxes.float(), "cxcywh", "xyxy")
    rank = scores.to(torch.float64, copy=True)  # exact after the bonus is added, so survivors keep their order
    # One NMS over the whole batch, each image (and class) a group of its own: no loop over the images, so an
    # exported graph (detr.export) takes any batch size.
    images, cells = valid.nonzero(as_tuple=True)
    groups = images if classes is None else images * (classes.max() + 1) + classes[images, cells]
    kept = batched_nms(xyxy[images, cells], scores[images, cells].float(), groups, nms_iou)
    rank[images[kept], cells[kept]] += SURVIVOR_BONUS
    return rank.topk(count, dim=1).indices


def gather_cells(values: Tensor, indices: Tensor) -> Tensor:
    """values [B, N, C] at indices [B, K] -> [B, K, C]."""
    return values.gather(1, indices[..., None].expand(-1, -1, values.shape[-1]))


class EncoderProposals(nn.Module):
    """The query source of a two-stage model: (positional queries [B, K, C], content [B, K, C], reference
    boxes [B, K, 4]) from the dense head's outputs, K = min(num_queries, cells)."""

    def __init__(self, hidden_dim: int, num_queries: int, nms: float = 0.0, nms_per_class: bool = False,
                 content: bool = False) -> None:
        super().__init__()
        self.query_pos = MLP(hidden_dim, hidden_dim, hidden_dim, 2)
        self.hidden_dim, self.num_queries = hidden_dim, num_queries
        self.nms, self.nms_per_class, self.content = nms, nms_per_class, content

    def forward(self, memory: Tensor, mask: Tensor, dense: dict) -> tuple[Tensor, Tensor, Tensor]:
        scores, classes = dense["pred_logits"][..., :-1].detach().max(-1)  # padding cells sit at the bottom
        count = min(self.num_queries, scores.shape[1])
        top = select_proposals(scores, dense["pred_boxes"].detach(), ~mask.flatten(1), count, self.nms,
                               classes if self.nms_per_class else None)
        reference = gather_cells(dense["pred_boxes"], top).detach()
        if self.content:
            content = gather_cells(memory.flatten(2).transpose(1, 2), top).detach()
        else:
            content = reference.new_zeros(*reference.shape[:2], self.hidden_dim)
        return self.query_pos(box_sine_embedding(reference, self.hidden_dim)), content, reference
