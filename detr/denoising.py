"""Denoising queries (DN-DETR): noised copies of the targets that the decoder must restore.

Hungarian matching changes its mind often early in training, so the decoder's targets
jump from step to step. Denoising queries give it a second task whose answer is fixed:
each target box, jittered, and its label, sometimes flipped, enter the decoder as extra
queries, and each must come out as the original target. Their losses need no matching.

Layout: for a batch whose images have at most `m` targets, `groups * m` queries per image,
slot `g * m + j` holding target `j`'s noised copy in group `g` (slots past an image's own
targets are padding, flagged in `valid`). They follow the model's own queries, and
`denoising_attention_mask` keeps the model's queries from seeing them and each group from
seeing the others (the answers would leak), as in the paper.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn


@dataclass
class DenoisingQueries:
    """The denoising part of a training batch."""

    content: Tensor
    """[B, D, C] the noised labels' embeddings (the queries' content)."""
    reference: Tensor
    """[B, D, 4] noised boxes, normalised cxcywh (the queries' positions)."""
    valid: Tensor
    """[B, D] bool: slots holding a target (the rest pad the batch)."""
    labels: Tensor
    """[B, D] int64: each slot's true label (0 on padding)."""
    boxes: Tensor
    """[B, D, 4]: each slot's true box."""
    groups: int

    @property
    def size(self) -> int:
        return self.content.shape[1]


def noised_boxes(boxes: Tensor, scale: float) -> Tensor:
    """DN-DETR's box noise on cxcywh boxes: centres shift by up to `scale` * half the size, sizes
    change by up to `scale` of themselves; clamped into the image."""
    size = boxes[..., 2:]
    spread = torch.cat([size / 2, size], dim=-1)
    jitter = (torch.rand_like(boxes) * 2 - 1) * spread * scale
    return (boxes + jitter).clamp(1e-4, 1.0)


def denoising_queries(
    targets: Sequence[Mapping[str, Tensor]],
    groups: int,
    label_embed: nn.Embedding,
    label_noise: float,
    box_noise: float,
) -> DenoisingQueries | None:
    """`groups` noised copies of every image's targets ("labels" [N], "boxes" [N,4] cxcywh); None
    when no image has a target."""
    most = max((len(t["labels"]) for t in targets), default=0)
    if most == 0 or groups == 0:
        return None
    device = label_embed.weight.device
    batch, slots = len(targets), groups * most
    labels = torch.zeros(batch, slots, dtype=torch.int64, device=device)
    boxes = torch.full((batch, slots, 4), 0.5, device=device)
    valid = torch.zeros(batch, slots, dtype=torch.bool, device=device)
    for i, t in enumerate(targets):
        n = len(t["labels"])
        if n == 0:
            continue
        index = (torch.arange(groups, device=device)[:, None] * most + torch.arange(n, device=device)).flatten()
        labels[i, index] = t["labels"].to(device).long().repeat(groups)
        boxes[i, index] = t["boxes"].to(device=device, dtype=boxes.dtype).repeat(groups, 1)
        valid[i, index] = True
    flipped = torch.rand(labels.shape, device=device) < label_noise
    noisy_labels = torch.where(flipped, torch.randint_like(labels, label_embed.num_embeddings), labels)
    return DenoisingQueries(
        content=label_embed(noisy_labels),
        reference=noised_boxes(boxes, box_noise),
        valid=valid,
        labels=labels,
        boxes=boxes,
        groups=groups,
    )


def denoising_attention_mask(num_queries: int, groups: int, group_size: int, device: torch.device) -> Tensor:
    """[Q+D, Q+D] bool self-attention mask for the model's `num_queries` queries followed by `groups`
    denoising groups of `group_size`: True (blocked) where a model query would see a denoising query,
    or a denoising query one of another group. Denoising queries see the model's queries."""
    total = num_queries + groups * group_size
    # Group -1 for the model's queries, 0..groups-1 for the denoising ones.
    group = torch.full((total,), -1, device=device)
    group[num_queries:] = torch.arange(groups * group_size, device=device) // group_size
    rows, cols = group[:, None], group[None, :]
    return (cols >= 0) & (rows != cols)
