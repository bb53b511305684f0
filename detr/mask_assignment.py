"""Which encoder cells train on which target: the dense head's positives under `DenseHead.mask_assignment`.

One-to-many matching gives each target its k best cells and trains every other cell as
background, which for a stuff region means two cells say "grass" and the hundred others
say "nothing". With masks in the targets, each target keeps its k best-matched cells
(weight 1 each, as before) and every other cell whose centre lies inside its mask becomes
its positive too (a cell inside several masks goes to the smallest target, the way FCOS
assigns boxes), these sharing a further weight of k. Objects keep the sharp one-to-many
signal that makes them fast to learn; stuff regions stop teaching their cells "background"
(what it measured on the panoptic benchmark: docs/panoptic.md).

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


def mask_assignment(matched: MatchIndices, targets: Sequence[Mapping[str, Tensor]], grid: tuple[int, int],
                    stride: int, k: int) -> tuple[MatchIndices, Tensor]:
    """Per image, (cell indices, target indices) of the dense head's positives and their weights: each
    target's `k` best-matched cells (`matched`: the one-to-many match against the targets repeated `k`
    times; weight 1 each), then the other cells inside its mask, which share a further weight of `k`."""
    indices, weights = [], []
    for t, (m_cells, which) in zip(targets, matched):
        n = len(t["labels"])
        cells, owners = covered_cells(t["masks"], grid, stride)
        m_cells, m_owners = m_cells.to(cells.device), (which.to(cells.device) % max(n, 1))
        extra = ~torch.isin(cells, m_cells)
        cells, owners = cells[extra], owners[extra]
        counts = torch.bincount(owners, minlength=n).float()
        indices.append((torch.cat([m_cells, cells]).to(torch.int64), torch.cat([m_owners, owners]).to(torch.int64)))
        weights.append(torch.cat([torch.ones(len(m_cells), device=cells.device), k / counts[owners]]))
    return indices, torch.cat(weights) if weights else torch.zeros(0)


__all__ = ["covered_cells", "mask_assignment"]
