"""Per-cell semantic supervision of the encoder: every cell learns the class of the segment under it.

DETR's losses reach a stuff region through one query and, with the dense head, a few of its
cells, so textures separate slowly (what the panoptic benchmark measured: docs/panoptic.md). This auxiliary loss
(`DETRConfig.semantic_head`, training only, as Panoptic FPN's semantic branch) gives
every cell that signal: a linear head on the encoder memory, cross-entropy against the class
of the segment covering the cell's centre (`detr.mask_assignment.covered_cells`: the smallest
segment where several overlap), averaged over the labelled cells of the whole batch (across
workers, like the box losses). Cells whose centres no segment covers, and padding, are left out.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .distributed import all_reduce_mean
from .mask_assignment import covered_cells


def cell_labels(targets: Sequence[Mapping[str, Tensor]], grid: tuple[int, int], stride: int
                ) -> tuple[Tensor, Tensor, Tensor]:
    """(image indices, cell indices, class labels) of every cell whose centre lies inside a target mask."""
    images, cells, labels = [], [], []
    for i, t in enumerate(targets):
        covered, owners = covered_cells(t["masks"], grid, stride)
        images.append(torch.full_like(covered, i))
        cells.append(covered)
        labels.append(t["labels"].to(covered.device)[owners])
    if not images:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty, empty
    return torch.cat(images), torch.cat(cells), torch.cat(labels)


def semantic_cell_loss(semantic: Mapping, targets: Sequence[Mapping[str, Tensor]]) -> Tensor:
    """The mean cross-entropy of `semantic["logits"]` [B, H*W, C] over the labelled cells of the batch
    (all workers); zero, still in the graph (DDP waits for every gradient), when targets carry no masks."""
    logits = semantic["logits"]
    total = logits.sum() * 0.0  # keeps the head in the graph when no cell is labelled
    count = 0
    if targets and all("masks" in t for t in targets):
        images, cells, labels = (x.to(logits.device) for x in cell_labels(targets, semantic["grid"],
                                                                         semantic["stride"]))
        total = total + F.cross_entropy(logits[images, cells].float(), labels, reduction="sum")
        count = len(labels)
    # Every worker takes part in the all-reduce, labelled cells or not.
    mean_count = all_reduce_mean(torch.tensor([float(count)], device=logits.device))[0]
    return total / mean_count.clamp(min=1.0)


class SemanticHead(nn.Module):
    """A linear classifier over the encoder memory: logits [B, H*W, num_classes] of every cell (training only),
    with the cells' `grid` and `stride` that `semantic_cell_loss` labels them by."""

    def __init__(self, hidden_dim: int, num_classes: int, stride: int) -> None:
        super().__init__()
        self.classifier = nn.Linear(hidden_dim, num_classes)
        self.stride = stride

    def forward(self, memory: Tensor) -> dict:
        return {"logits": self.classifier(memory.flatten(2).transpose(1, 2)), "grid": tuple(memory.shape[-2:]),
                "stride": self.stride}
