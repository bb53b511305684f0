"""The dense encoder head (`DETRConfig.dense_head`): a class and a box at every encoder cell.

Trained one-to-many (`detr.criterion.DenseHeadLoss`), it teaches a backbone learning from scratch to
localise; with `two_stage` its best cells become the decoder's queries (`detr.proposals`).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .batching import image_sizes_from_mask
from .heads import MLP, start_at_focal_prior, start_at_reference

PADDING_LOGIT = -1e4
"""The class logit of padding cells: never an object, and last in any ranking."""


def cell_boxes(memory: Tensor, mask: Tensor) -> Tensor:
    """[B, H*W, 4] cxcywh box of every cell: centred on the cell, two cells wide, in the image's own
    (unpadded) normalised coordinates."""
    batch, _, height, width = memory.shape
    valid_h, valid_w = image_sizes_from_mask(mask).clamp(min=1).to(memory.dtype).unbind(1)
    ys = (torch.arange(height, device=memory.device, dtype=memory.dtype) + 0.5)[None, :, None] / valid_h[:, None, None]
    xs = (torch.arange(width, device=memory.device, dtype=memory.dtype) + 0.5)[None, None, :] / valid_w[:, None, None]
    cells = torch.stack([xs.expand(batch, height, width), ys.expand(batch, height, width),
                         (2 / valid_w)[:, None, None].expand(batch, height, width),
                         (2 / valid_h)[:, None, None].expand(batch, height, width)], dim=-1)
    return cells.flatten(1, 2)


class DenseEncoderHead(nn.Module):
    """Class logits [B, H*W, num_classes + 1] and boxes [B, H*W, 4] for every encoder cell; boxes are
    offsets (in logit space) from the cell's own box (`cell_boxes`), and start at it."""

    def __init__(self, hidden_dim: int, num_classes: int, stride: int) -> None:
        super().__init__()
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.stride = stride
        start_at_focal_prior(self.class_embed)
        start_at_reference(self.bbox_embed)

    def forward(self, memory: Tensor, mask: Tensor) -> dict:
        """`memory` [B, C, H, W], `mask` [B, H, W] True on padding. Also returns the cells' `grid` (H, W) and
        `stride` (input pixels per cell), which the mask-aware assignment needs."""
        reference = torch.logit(cell_boxes(memory, mask).clamp(1e-3, 1 - 1e-3))
        tokens = memory.flatten(2).transpose(1, 2)
        logits = self.class_embed(tokens).masked_fill(mask.flatten(1)[..., None], PADDING_LOGIT)
        boxes = (reference + self.bbox_embed(tokens)).sigmoid()
        return {"pred_logits": logits, "pred_boxes": boxes, "grid": tuple(memory.shape[-2:]), "stride": self.stride}
