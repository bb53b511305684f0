"""Padding differently sized images into one batch, the form the model consumes.

DETR sees a batch as `(images, mask)`: images zero-padded at the bottom and right
to the largest height and width in the batch, and a mask that is True on padding.
The padding never reaches the transformer because the mask is carried down to the
feature map and excluded from attention and from the positional encodings.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def pad_images(images: Sequence[Tensor], size_divisibility: int = 1) -> tuple[Tensor, Tensor]:
    """Pad a list of [3, H_i, W_i] tensors into `(images [B,3,H,W], mask [B,H,W])`.

    `mask` is True on padded pixels. `size_divisibility` rounds the padded size up
    to a multiple (useful for fixed-shape compiled models); 1 keeps the tightest size.
    """
    if len(images) == 0:
        raise ValueError("pad_images needs at least one image")
    for i, img in enumerate(images):
        if img.ndim != 3:
            raise ValueError(f"image {i} has shape {tuple(img.shape)}; expected [C, H, W]")
    channels = {img.shape[0] for img in images}
    if len(channels) != 1:
        raise ValueError(f"images have different channel counts: {sorted(channels)}")
    max_h = max(img.shape[1] for img in images)
    max_w = max(img.shape[2] for img in images)
    if size_divisibility > 1:
        max_h = -(-max_h // size_divisibility) * size_divisibility
        max_w = -(-max_w // size_divisibility) * size_divisibility
    first = images[0]
    batch = first.new_zeros((len(images), first.shape[0], max_h, max_w))
    mask = torch.ones((len(images), max_h, max_w), dtype=torch.bool, device=first.device)
    for img, pad_img, m in zip(images, batch, mask):
        _, h, w = img.shape
        pad_img[:, :h, :w].copy_(img)
        m[:h, :w] = False
    return batch, mask


def image_sizes_from_mask(mask: Tensor) -> Tensor:
    """Recover each image's unpadded (height, width) from a padding mask [B,H,W]."""
    valid = ~mask
    heights = valid.any(dim=2).sum(dim=1)
    widths = valid.any(dim=1).sum(dim=1)
    return torch.stack([heights, widths], dim=1)
