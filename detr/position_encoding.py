"""2-D positional encodings of the feature map, added to queries and keys in attention.

The sine encoding is the paper's default: for each pixel, the cumulative count of
non-padding pixels along y and x, normalised to [0, 2π] per image (so an image
padded inside a batch is encoded exactly as if it were alone), then sines and
cosines at geometrically spaced frequencies (temperature 10000). The learned
variant keeps an embedding per row and per column (at most 50 of each).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class PositionEmbeddingSine(nn.Module):
    """Sine/cosine encoding of normalised (y, x) positions; padding excluded from the counts."""

    def __init__(
        self,
        num_pos_feats: int = 128,
        temperature: float = 10000.0,
        normalize: bool = True,
        scale: float = 2 * math.pi,
    ) -> None:
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale

    def forward(self, mask: Tensor) -> Tensor:
        """[B,H,W] padding mask -> [B, 2*num_pos_feats, H, W] encoding (y features first)."""
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale

        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_pos_feats)

        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class PositionEmbeddingLearned(nn.Module):
    """Absolute learned embeddings: one vector per column (x) and per row (y)."""

    max_size = 50

    def __init__(self, num_pos_feats: int = 128) -> None:
        super().__init__()
        self.row_embed = nn.Embedding(self.max_size, num_pos_feats)
        self.col_embed = nn.Embedding(self.max_size, num_pos_feats)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, mask: Tensor) -> Tensor:
        """[B,H,W] mask (only its shape is used) -> [B, 2*num_pos_feats, H, W] (x features first)."""
        batch, h, w = mask.shape
        if h > self.max_size or w > self.max_size:
            raise ValueError(
                f"learned position embeddings cover at most {self.max_size}x{self.max_size} feature maps, "
                f"got {h}x{w}; use smaller images or the sine encoding"
            )
        x_emb = self.col_embed(torch.arange(w, device=mask.device))
        y_emb = self.row_embed(torch.arange(h, device=mask.device))
        pos = torch.cat([x_emb.unsqueeze(0).expand(h, w, -1), y_emb.unsqueeze(1).expand(h, w, -1)], dim=-1)
        return pos.permute(2, 0, 1).unsqueeze(0).expand(batch, -1, -1, -1)


def box_sine_embedding(boxes: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """[..., 4] normalised boxes -> [..., dim]: each coordinate as `dim // 4` sines and cosines,
    scaled by 2*pi as the 2-D sine encoding is (positional queries from boxes, DAB/Deformable DETR)."""
    per_coord = dim // 4
    if per_coord * 4 != dim or per_coord % 2:
        raise ValueError(f"box embedding size must be a multiple of 8, got {dim}")
    dim_t = torch.arange(per_coord, dtype=torch.float32, device=boxes.device)
    dim_t = temperature ** (2 * (dim_t // 2) / per_coord)
    angles = boxes.float()[..., None] * (2 * math.pi) / dim_t  # [..., 4, per_coord]
    embedding = torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)
    return embedding.flatten(-2).to(boxes.dtype)


def build_position_encoding(kind: str, hidden_dim: int) -> nn.Module:
    """The encoding named in the config, producing `hidden_dim` channels."""
    if kind == "sine":
        return PositionEmbeddingSine(hidden_dim // 2, normalize=True)
    if kind == "learned":
        return PositionEmbeddingLearned(hidden_dim // 2)
    raise ValueError(f"unknown position embedding {kind!r}; use 'sine' or 'learned'")
