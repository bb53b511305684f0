"""The DETR detector: backbone -> transformer -> set of (class, box) predictions.

Forward contract: `model(images, mask)` with `images` float [B,3,H,W]
(ImageNet-normalised, zero-padded at the bottom and right; see `pad_images`) and
`mask` bool [B,H,W], True on padding. It returns

- `"pred_logits"` [B, Q, num_classes + 1]: class logits, the last being "no object";
- `"pred_boxes"` [B, Q, 4]: boxes as normalised (cx, cy, w, h) in [0, 1], relative
  to each image's own (unpadded) size;
- `"aux_outputs"`: the same two entries for every decoder layer but the last
  (when `aux_loss` is on), for the auxiliary losses.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .backbone import Backbone
from .config import DETRConfig
from .position_encoding import build_position_encoding
from .transformer import Transformer


class MLP(nn.Module):
    """A plain multi-layer perceptron with ReLU between layers (the box head)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims, outs))

    def forward(self, x: Tensor) -> Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = F.relu(x)
        return x


class DETR(nn.Module):
    """DEtection TRansformer. Parameter names follow the official checkpoints where they can."""

    def __init__(self, config: DETRConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = Backbone(
            config.backbone, config.dilation, config.train_backbone, padding_invariant=config.padding_invariant
        )
        if config.backbone_weights:
            self.backbone.load_torchvision_weights(config.backbone_weights)
        self.position_encoding = build_position_encoding(config.position_embedding, config.hidden_dim)
        self.input_proj = nn.Conv2d(self.backbone.num_channels, config.hidden_dim, kernel_size=1)
        self.transformer = Transformer(
            d_model=config.hidden_dim,
            nhead=config.nheads,
            num_encoder_layers=config.enc_layers,
            num_decoder_layers=config.dec_layers,
            dim_feedforward=config.dim_feedforward,
            dropout=config.dropout,
            pre_norm=config.pre_norm,
        )
        self.query_embed = nn.Embedding(config.num_queries, config.hidden_dim)
        self.class_embed = nn.Linear(config.hidden_dim, config.num_classes + 1)
        self.bbox_embed = MLP(config.hidden_dim, config.hidden_dim, 4, 3)

    @property
    def num_queries(self) -> int:
        return self.config.num_queries

    def forward(self, images: Tensor, mask: Tensor) -> dict:
        if images.ndim != 4 or mask.ndim != 3 or images.shape[0] != mask.shape[0] or images.shape[-2:] != mask.shape[-2:]:
            raise ValueError(
                f"expected images [B,3,H,W] and mask [B,H,W] of the same B, H, W; got "
                f"{tuple(images.shape)} and {tuple(mask.shape)} (use detr.pad_images to build them)"
            )
        features, masks = self.backbone(images, mask)
        src, src_mask = features[-1], masks[-1]
        pos = self.position_encoding(src_mask).to(src.dtype)
        src_proj = self.input_proj(src)
        hs, memory = self.transformer(src_proj, src_mask, self.query_embed.weight, pos)
        return self.predict_from_decoder(hs)

    def predict_from_decoder(self, hs: Tensor) -> dict:
        """Class and box heads over every decoder layer's output [L,B,Q,C]."""
        logits = self.class_embed(hs)
        boxes = self.bbox_embed(hs).sigmoid()
        out: dict = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.config.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
        return out


def build_model(config: DETRConfig | str = "detr_r50", **overrides) -> DETR:
    """Build a randomly initialised DETR from a config or a preset name (with optional overrides)."""
    if isinstance(config, str):
        config = DETRConfig.preset(config, **overrides)
    elif overrides:
        config = config.replace(**overrides)
    return DETR(config)
