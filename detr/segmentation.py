"""The paper's mask head (section 4.4) and the mask losses.

`DETRsegm` wraps a detector as the official code does (its keys under `detr.`, then `bbox_attention.*`
and `mask_head.*`: the official panoptic layout) and adds "pred_masks" [B, Q, H/4, W/4] to its outputs.

For every object query, `MHAttentionMap` computes multi-head attention weights
of the last decoder output over the encoder memory (weights only, no values;
padding masked out; as in the official code, one softmax spans all heads and
positions; `MaskHead.scaled_attention` rescales them to average 1). `MaskHeadSmallConv` concatenates those maps with the projected
stride-32 features and upsamples them through GroupNorm convolutions, adding
the backbone's stride-16, stride-8 and stride-4 features (FPN adapters whose
widths follow the backbone: 1024/512/256 for ResNet-50/101, 256/128/64 for
ResNet-18/34), to one mask logit map per query at a quarter of the input size.
Parameter names are the official ones (`bbox_attention.*`, `mask_head.*`).

Padding. With `valid` maps (a padding-invariant model on a padded batch), the
projected features are zeroed on padding, every GroupNorm takes its statistics
over the image's own cells only (`MaskedGroupNorm`) and zeroes the padding of
its output, so each convolution sees exactly the zero border it sees on the
image alone, and the nearest-neighbour upsampling maps cell i to cells 2i and
2i+1 in both cases: an image's masks come out as they do alone (up to float
rounding). Without `valid` the head is the official one, bit for bit.

Mask geometry. Mask cell i covers input pixels [4i, 4i + 4): an image of h x w
pixels owns the top-left ceil(h/4) x ceil(w/4) cells of `pred_masks`.
`masks_to_image` crops those cells, upsamples them exactly 4x (bilinear) and
crops the result to h x w.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from .config import MASK_HEAD_GROUPS, DETRConfig
from .model import DETR, InferenceGuard, MaskQueries

MASK_STRIDE = 4
"""`pred_masks` has one cell per 4x4 input pixels."""

DETECTOR_PREFIX = "detr."
"""Where `DETRsegm` (ours and the official) keeps its detector's state-dict keys."""

MASK_HEAD_PREFIXES = ("bbox_attention.", "mask_head.")
"""State-dict prefixes of the mask head's parameters (the official names)."""

UNCOMPUTED_MASK_LOGIT = -1.0e4
"""The value of `pred_masks` entries of queries whose masks were not computed (see `DETRsegm.forward`)."""


class DETRsegm(InferenceGuard):
    """A detector with the mask head.

    `model(images, mask, mask_queries=...)` computes masks only for some queries, the expensive part of
    the head being per query: a bool tensor [B, Q], or a callable that receives the detection outputs and
    returns one (e.g. the queries that survive a score threshold, or those the matcher assigns to targets;
    `detr.boxes_only`: none). The selected masks equal those computed for all queries; the others hold
    `UNCOMPUTED_MASK_LOGIT`, and the outputs carry the selection as `"mask_queries"`.

    With a padding-invariant detector the head is padding-invariant too (see the module docstring).
    """

    MASK_MODULES = MASK_HEAD_PREFIXES
    """Name prefixes of the mask head's parameters."""

    def __init__(self, detr: DETR, config: DETRConfig) -> None:
        super().__init__()
        head = config.mask_head
        self.detr = detr
        self.bbox_attention = MHAttentionMap(config.hidden_dim, config.hidden_dim, config.nheads, dropout=0.0,
                                             scaled=head.scaled_attention)
        self.mask_head = MaskHeadSmallConv(config.hidden_dim + config.nheads, config.fpn_dims, config.hidden_dim)
        self.fpn_stages = config.fpn_stage_indices
        self.padding_invariant = config.padding_invariant
        self.config = config
        if head.freeze_detector:
            self.detr.requires_grad_(False)  # the paper: the mask head trains on a trained detector

    @property
    def num_queries(self) -> int:
        return self.detr.num_queries

    def forward(self, images: Tensor, mask: Tensor, mask_queries: MaskQueries = None) -> dict:
        out, seen = self.detr.forward_features(images, mask)
        queries = seen.decoded.shape[:2]
        selected = None if mask_queries is None else torch.as_tensor(
            mask_queries(out) if callable(mask_queries) else mask_queries, dtype=torch.bool, device=images.device)
        if selected is not None and selected.shape != queries:
            raise ValueError(f"mask_queries must be a bool [B, Q] = {list(queries)} selection, "
                             f"got shape {tuple(selected.shape)}")
        valid = None
        if self.padding_invariant and bool(mask.any()):
            stages = [seen.masks[-1]] + [seen.masks[i] for i in self.fpn_stages]
            valid = [(~m)[:, None].to(seen.src_proj.dtype) for m in stages]
        rows, cols = (torch.ones(queries, dtype=torch.bool, device=images.device) if selected is None
                      else selected).nonzero(as_tuple=True)
        pred_masks = seen.src_proj.new_full((*queries, *seen.features[0].shape[-2:]), UNCOMPUTED_MASK_LOGIT)
        if len(rows):  # none selected (`boxes_only`): the head, attention maps included, does not run
            attention = self.bbox_attention(seen.decoded, seen.memory, mask=seen.masks[-1])
            fpns = [seen.features[i] for i in self.fpn_stages]
            logits = self.mask_head(seen.src_proj, attention[rows, cols], fpns, rows, valid)
            pred_masks = pred_masks.index_put((rows, cols), logits[:, 0])
        out["pred_masks"] = pred_masks
        if selected is not None:
            out["mask_queries"] = selected
        return out


class MHAttentionMap(nn.Module):
    """2-D multi-head attention that returns only the attention weights: [B, Q, heads, h, w].

    `scaled`: the weights times the number of (head, unpadded position) cells, averaging 1 over the
    image whatever its size or padding (see `DETRConfig.scaled_mask_attention`).
    """

    def __init__(self, query_dim: int, hidden_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 scaled: bool = False):
        super().__init__()
        self.scaled = scaled
        self.num_heads = num_heads
        self.hidden_dim = hidden_dim
        self.dropout = nn.Dropout(dropout)
        self.q_linear = nn.Linear(query_dim, hidden_dim, bias=bias)
        self.k_linear = nn.Linear(query_dim, hidden_dim, bias=bias)
        nn.init.zeros_(self.k_linear.bias)
        nn.init.zeros_(self.q_linear.bias)
        nn.init.xavier_uniform_(self.k_linear.weight)
        nn.init.xavier_uniform_(self.q_linear.weight)
        self.normalize_fact = float(hidden_dim / self.num_heads) ** -0.5

    def forward(self, q: Tensor, k: Tensor, mask: Tensor | None = None) -> Tensor:
        """q [B, Q, C] decoder outputs, k [B, C, h, w] encoder memory, mask [B, h, w] True on padding."""
        q = self.q_linear(q)
        k = F.conv2d(k, self.k_linear.weight.unsqueeze(-1).unsqueeze(-1), self.k_linear.bias)
        qh = q.view(q.shape[0], q.shape[1], self.num_heads, self.hidden_dim // self.num_heads)
        kh = k.view(k.shape[0], self.num_heads, self.hidden_dim // self.num_heads, k.shape[-2], k.shape[-1])
        weights = torch.einsum("bqnc,bnchw->bqnhw", qh * self.normalize_fact, kh)
        if mask is not None:
            weights = weights.masked_fill(mask.unsqueeze(1).unsqueeze(1), float("-inf"))
        weights = F.softmax(weights.flatten(2), dim=-1).view(weights.size())
        if self.scaled:
            positions = k.shape[-2] * k.shape[-1] if mask is None else (~mask).sum((1, 2)).view(-1, 1, 1, 1, 1)
            weights = weights * (self.num_heads * positions)
        return self.dropout(weights)


class MaskedGroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics cover only the valid (non-padded) cells when `valid` is given.

    `valid` is a float [N, 1, H, W] map, 1 on the image; the output is zero elsewhere.
    Without `valid` it is exactly `nn.GroupNorm`.
    """

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Tensor:  # type: ignore[override]
        if valid is None:
            return super().forward(x)
        n, c, h, w = x.shape
        groups = self.num_groups
        xg = x.reshape(n, groups, c // groups, h, w)
        v = valid.reshape(n, 1, 1, h, w).to(x.dtype)
        count = (v.sum(dim=(2, 3, 4)) * (c // groups)).clamp(min=1.0)
        mean = (xg * v).sum(dim=(2, 3, 4)) / count
        centred = xg - mean[:, :, None, None, None]
        var = (centred.square() * v).sum(dim=(2, 3, 4)) / count
        out = centred * torch.rsqrt(var + self.eps)[:, :, None, None, None]
        out = out.reshape(n, c, h, w)
        if self.affine:
            out = out * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return out * valid.to(x.dtype)


class MaskHeadSmallConv(nn.Module):
    """The FPN-like convolutional mask head with GroupNorm (official name and layout).

    `dim` = hidden_dim + nheads input channels, `fpn_dims` the backbone's stride-16/8/4
    channels, `context_dim` = hidden_dim; widths halve from hidden_dim/2 to hidden_dim/16.
    """

    def __init__(self, dim: int, fpn_dims: Sequence[int], context_dim: int):
        super().__init__()
        inter_dims = [dim, context_dim // 2, context_dim // 4, context_dim // 8, context_dim // 16, context_dim // 64]
        g = MASK_HEAD_GROUPS
        self.lay1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.gn1 = MaskedGroupNorm(g, dim)
        self.lay2 = nn.Conv2d(dim, inter_dims[1], 3, padding=1)
        self.gn2 = MaskedGroupNorm(g, inter_dims[1])
        self.lay3 = nn.Conv2d(inter_dims[1], inter_dims[2], 3, padding=1)
        self.gn3 = MaskedGroupNorm(g, inter_dims[2])
        self.lay4 = nn.Conv2d(inter_dims[2], inter_dims[3], 3, padding=1)
        self.gn4 = MaskedGroupNorm(g, inter_dims[3])
        self.lay5 = nn.Conv2d(inter_dims[3], inter_dims[4], 3, padding=1)
        self.gn5 = MaskedGroupNorm(g, inter_dims[4])
        self.out_lay = nn.Conv2d(inter_dims[4], 1, 3, padding=1)
        self.dim = dim
        self.adapter1 = nn.Conv2d(fpn_dims[0], inter_dims[1], 1)
        self.adapter2 = nn.Conv2d(fpn_dims[1], inter_dims[2], 1)
        self.adapter3 = nn.Conv2d(fpn_dims[2], inter_dims[3], 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.constant_(m.bias, 0)

    def forward(
        self,
        x: Tensor,
        bbox_mask: Tensor,
        fpns: Sequence[Tensor],
        rows: Tensor,
        valid: Sequence[Tensor | None] | None = None,
    ) -> Tensor:
        """Mask logits [N, 1, H/4, W/4] for N (image, query) rows.

        `x` [B, C, h, w] projected stride-32 features, `bbox_mask` [N, heads, h, w] the rows'
        attention maps, `fpns` the stride-16, 8, 4 features [B, ...], `rows` [N] the image of each
        row, `valid` (padding-invariant mode) float [B, 1, ., .] maps of the image area at strides
        32, 16, 8 and 4.
        """
        v = [None] * 4 if valid is None else [None if t is None else t[rows] for t in valid]
        x = x[rows]
        if v[0] is not None:
            x = x * v[0]  # the 1x1 projection's bias would otherwise fill the padding
        x = torch.cat([x, bbox_mask], 1)
        x = F.relu(self.gn1(self.lay1(x), v[0]))
        x = F.relu(self.gn2(self.lay2(x), v[0]))
        stages = ((self.adapter1, self.lay3, self.gn3), (self.adapter2, self.lay4, self.gn4),
                  (self.adapter3, self.lay5, self.gn5))
        for (adapter, lay, gn), fpn, valid_here in zip(stages, fpns, v[1:]):
            cur_fpn = adapter(fpn)[rows]
            x = cur_fpn + F.interpolate(x, size=cur_fpn.shape[-2:], mode="nearest")
            if valid_here is not None:
                x = x * valid_here
            x = F.relu(gn(lay(x), valid_here))
        return self.out_lay(x)


# -- geometry ----------------------------------------------------------------------------------
def mask_cells(size: Sequence[int]) -> tuple[int, int]:
    """The (rows, columns) of mask cells an image of `size` (h, w) pixels owns."""
    return math.ceil(int(size[0]) / MASK_STRIDE), math.ceil(int(size[1]) / MASK_STRIDE)


def masks_to_image(logits: Tensor, size: Sequence[int]) -> Tensor:
    """[N, H4, W4] mask logits of one image (padded grid) -> [N, h, w] logits at its own pixels.

    Crops the image's cells, upsamples them exactly 4x (bilinear, half-pixel centres) and crops to
    (h, w): the geometry of a model whose cell i covers pixels [4i, 4i + 4), independent of padding.
    """
    h, w = int(size[0]), int(size[1])
    ch, cw = mask_cells((h, w))
    if logits.shape[-2] < ch or logits.shape[-1] < cw:
        raise ValueError(f"masks of {tuple(logits.shape[-2:])} cells cannot cover a {h}x{w} image")
    cells = logits[:, :ch, :cw]
    if cells.shape[0] == 0:
        return cells.new_zeros((0, h, w))
    up = F.interpolate(cells[:, None].float(), size=(ch * MASK_STRIDE, cw * MASK_STRIDE), mode="bilinear",
                       align_corners=False)
    return up[:, 0, :h, :w]


# -- losses ------------------------------------------------------------------------------------
def mask_focal_loss(inputs: Tensor, targets: Tensor) -> Tensor:
    """RetinaNet's focal loss (torchvision's, alpha 0.25, gamma 2) per mask: [N, P] logits and binary
    targets -> [N], the mean over pixels, as the official mask loss."""
    return sigmoid_focal_loss(inputs, targets, reduction="none").mean(1)


def dice_loss(inputs: Tensor, targets: Tensor) -> Tensor:
    """1 - the soft dice coefficient (with +1 smoothing) per mask: [N, P] logits and targets -> [N]."""
    inputs = inputs.sigmoid()
    numerator = 2 * (inputs * targets).sum(1)
    denominator = inputs.sum(-1) + targets.sum(-1)
    return 1 - (numerator + 1) / (denominator + 1)


__all__ = [
    "MASK_STRIDE",
    "UNCOMPUTED_MASK_LOGIT",
    "MHAttentionMap",
    "MaskHeadSmallConv",
    "MaskedGroupNorm",
    "dice_loss",
    "mask_cells",
    "masks_to_image",
    "mask_focal_loss",
]
