"""Which encoder cells a target's mask covers: the dense head's positives under `encoder_mask_assignment`.

One-to-many matching gives each target its k best cells and trains every other cell as
background, which for a stuff region means two cells say "grass" and the hundred others
say "nothing". With masks in the targets, every cell whose centre lies inside a target's
mask is that target's positive instead (a cell inside several goes to the smallest target),
the way FCOS assigns boxes; targets too small to hold any cell centre keep their k
best-matched cells. Each target's k units of loss weight are shared among its cells
(`target_balanced_weights`), so the loss scale stays that of one-to-many matching.

Geometry: the transformer runs at `stride` pixels per cell; cell (r, c) covers input pixels
[stride*r, stride*r + stride) x [stride*c, stride*c + stride) and its centre is pixel
(stride*r + stride//2, stride*c + stride//2) of the image's own (processed) coordinates,
the same for an image alone or padded in a batch.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor

from .matcher import MatchIndices


def covered_cells(masks: Tensor, grid: tuple[int, int], stride: int) -> tuple[Tensor, Tensor]:
    """(cell indices, target indices) of the cells of a `grid` (rows, cols) whose centres lie inside the
    target `masks` [N, h, w]; a cell inside several masks goes to the one of fewest pixels."""
    rows, cols = grid
    n, h, w = masks.shape
    if n == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=masks.device)
        return empty, empty
    ys = torch.arange(rows, device=masks.device) * stride + stride // 2
    xs = torch.arange(cols, device=masks.device) * stride + stride // 2
    inside = (ys < h)[:, None] & (xs < w)[None, :]
    sampled = masks[:, ys.clamp(max=h - 1)][:, :, xs.clamp(max=w - 1)].bool() & inside  # [N, rows, cols]
    covered = sampled.flatten(1)
    area = masks.flatten(1).sum(1).float()
    owner_area = torch.where(covered, area[:, None], torch.full_like(covered, float("inf"), dtype=torch.float))
    owner = owner_area.argmin(0)
    cells = covered.any(0).nonzero().squeeze(1)
    return cells, owner[cells]


def mask_assignment(dense: Mapping[str, Tensor], targets: Sequence[Mapping[str, Tensor]], grid: tuple[int, int],
                    stride: int, matcher, k: int) -> MatchIndices:
    """Per image, (cell indices, target indices) of the dense head's positives: the cells inside each
    target's mask, then the `k` best-matched free cells of each target that covers no cell centre."""
    indices = []
    for i, t in enumerate(targets):
        cells, owners = covered_cells(t["masks"], grid, stride)
        missing = torch.ones(len(t["labels"]), dtype=torch.bool, device=cells.device)
        missing[owners] = False
        if missing.any():
            lost = missing.nonzero().squeeze(1)
            repeated = lost.repeat(k)
            single = {"pred_logits": dense["pred_logits"][i:i + 1], "pred_boxes": dense["pred_boxes"][i:i + 1]}
            (extra_cells, which), = matcher(single, [{"labels": t["labels"][repeated], "boxes": t["boxes"][repeated]}])
            free = ~torch.isin(extra_cells.to(cells.device), cells)
            cells = torch.cat([cells, extra_cells.to(cells.device)[free]])
            owners = torch.cat([owners, repeated[which.to(cells.device)][free]])
        indices.append((cells.to(torch.int64), owners.to(torch.int64)))
    return indices


def target_balanced_weights(indices: MatchIndices, k: int) -> Tensor:
    """One weight per positive (in `indices` order): `k` / the number of its target's positives, so each
    target weighs in the losses what its k cells weigh under one-to-many matching (a stuff region of
    hundreds of cells does not drown the objects, nor shrink the losses through their normaliser)."""
    weights = []
    for _, owners in indices:
        counts = torch.bincount(owners, minlength=int(owners.max()) + 1 if owners.numel() else 0)
        weights.append(k / counts[owners].float())
    return torch.cat(weights) if weights else torch.zeros(0)


__all__ = ["covered_cells", "mask_assignment", "target_balanced_weights"]
