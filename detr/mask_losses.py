"""The mask losses of matched queries (`loss_mask`, sigmoid focal; `loss_dice`), summed over matched pairs
and divided by the box normaliser, in two geometries chosen with the model's padding mode.

The official computation upsamples the padded `pred_masks` to the batch's padded target size and counts
padded pixels as background; a padding-invariant model instead scores each image's own pixels
(`detr.segmentation.masks_to_image`), so its loss does not depend on the batch.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .matcher import MatchIndices
from .segmentation import dice_loss, mask_focal_loss, masks_to_image


def matched_pairs(indices: MatchIndices) -> tuple[Tensor, Tensor]:
    """(image index, query index) of every matched prediction, in `indices` order."""
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    return batch_idx, torch.cat([src for src, _ in indices])


def mask_losses_per_image(pred: Tensor, targets: Sequence[Mapping], indices: MatchIndices) -> tuple[Tensor, Tensor]:
    """Summed focal and dice losses, each image's matched masks scored on its own pixels."""
    focal, dice = pred.sum() * 0.0, pred.sum() * 0.0
    for i, (t, (rows, cols)) in enumerate(zip(targets, indices)):
        if len(rows):
            target_masks = t["masks"][cols]
            src = masks_to_image(pred[i, rows], target_masks.shape[-2:]).flatten(1)
            tgt = target_masks.flatten(1).to(src.dtype)
            focal, dice = focal + mask_focal_loss(src, tgt).sum(), dice + dice_loss(src, tgt).sum()
    return focal, dice


def mask_losses_official(pred: Tensor, targets: Sequence[Mapping], indices: MatchIndices) -> tuple[Tensor, Tensor]:
    """Summed focal and dice losses the official way: padded targets, padded logits upsampled to them."""
    batch_idx, src_idx = matched_pairs(indices)
    if len(src_idx) == 0:
        return pred.sum() * 0.0, pred.sum() * 0.0
    max_h = max(int(t["masks"].shape[-2]) for t in targets)
    max_w = max(int(t["masks"].shape[-1]) for t in targets)
    target_masks = pred.new_zeros((len(src_idx), max_h, max_w), dtype=torch.float32)
    k = 0
    for t, (_, cols) in zip(targets, indices):
        m = t["masks"][cols]
        target_masks[k:k + len(cols), : m.shape[-2], : m.shape[-1]] = m.float()
        k += len(cols)
    src_masks = F.interpolate(pred[batch_idx, src_idx][:, None].float(), size=(max_h, max_w), mode="bilinear",
                              align_corners=False)[:, 0].flatten(1)
    target_masks = target_masks.flatten(1)
    return mask_focal_loss(src_masks, target_masks).sum(), dice_loss(src_masks, target_masks).sum()
