"""The DETR detector: backbone -> transformer -> set of (class, box) predictions.

Forward contract: `model(images, mask)` with `images` float [B,3,H,W]
(ImageNet-normalised, zero-padded at the bottom and right; see `pad_images`) and
`mask` bool [B,H,W], True on padding. It returns

- `"pred_logits"` [B, Q, num_classes + 1]: class logits, the last being "no object";
- `"pred_boxes"` [B, Q, 4]: boxes as normalised (cx, cy, w, h) in [0, 1], relative
  to each image's own (unpadded) size;
- `"aux_outputs"`: the same two entries for every decoder layer but the last
  (when `aux_loss` is on), for the auxiliary losses;
- `"enc_outputs"` (training with `encoder_aux_matches > 0` only): the dense head's
  `pred_logits` and `pred_boxes` for every encoder cell [B, H*W, ...], padding cells
  scored as certain background, and `"matches_per_target"`;
- with `config.masks`, `"pred_masks"` [B, Q, H/4, W/4]: mask logits of every query (see
  `detr.segmentation` for the head and the mask geometry), and `"padding_invariant"` (bool),
  which tells post-processing how the masks relate to padding.

`model(images, mask, mask_queries=...)` computes masks only for some queries, the
expensive part of the mask head being per query: a bool tensor [B, Q], or a callable
that receives the detection outputs and returns one (e.g. the queries that survive a
score threshold, or those the matcher assigns to targets). The selected masks equal
those computed for all queries; the others hold `UNCOMPUTED_MASK_LOGIT`, and the
outputs carry the selection as `"mask_queries"`.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, box_convert

from .backbone import STAGES, Backbone
from .config import DETRConfig
from .position_encoding import box_sine_embedding, build_position_encoding
from .segmentation import UNCOMPUTED_MASK_LOGIT, MaskHeadSmallConv, MHAttentionMap
from .transformer import Transformer

MaskQueries = Tensor | Callable[[dict], Tensor] | None


FOCAL_PRIOR = 0.01
"""Initial class probability of a focal-loss class head."""

TRAINING_ONLY_PREFIXES = ("encoder_class_embed.", "encoder_bbox_embed.", "semantic_embed.")
"""State-dict entries that only training uses (absent from official checkpoints and exports)."""

NON_OFFICIAL_PREFIXES = TRAINING_ONLY_PREFIXES + ("proposal_pos.",)
"""Weights of the fast-convergence options, absent from official checkpoints: they start fresh
when official (or detection-only) weights are loaded into a model that has them."""


def boxes_only(outputs: dict) -> Tensor:
    """A `mask_queries` selection of no query: a model with a mask head then gives its detections
    without the head's per-query cost (box evaluation, detection labelling); others ignore it."""
    logits = outputs["pred_logits"]
    return torch.zeros(logits.shape[:2], dtype=torch.bool, device=logits.device)


def select_proposals(scores: Tensor, boxes: Tensor, valid: Tensor, count: int, nms_iou: float = 0.0,
                     classes: Tensor | None = None) -> Tensor:
    """Indices [B, count] of the best cells by `scores` [B, N] (boxes [B, N, 4] cxcywh; `valid` [B, N]
    False on padding, whose scores are already at the bottom), best first. With `nms_iou` > 0, cells
    suppressed by a better cell's box (NMS among the valid cells; per class when `classes` [B, N]
    is given, else class-agnostic) come only after every surviving cell, so they fill the queries
    only when too few survive."""
    if nms_iou <= 0:
        return scores.topk(count, dim=1).indices
    xyxy = box_convert(boxes.float(), "cxcywh", "xyxy")
    rank = scores.to(torch.float64, copy=True)  # exact after the bonus is added, so survivors keep their order
    for image in range(scores.shape[0]):
        cells = valid[image].nonzero().squeeze(1)
        groups = torch.zeros_like(cells) if classes is None else classes[image, cells]  # one group: agnostic
        kept = batched_nms(xyxy[image, cells], scores[image, cells].float(), groups, nms_iou)
        rank[image, cells[kept]] += SURVIVOR_BONUS
    return rank.topk(count, dim=1).indices


SURVIVOR_BONUS = 1e6
"""Added to the scores of cells that survive proposal NMS, to rank them above every other cell."""


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
            config.backbone,
            config.dilation,
            config.train_backbone,
            # The mask head also reads the stride-4, 8 and 16 features.
            return_stages=STAGES[: config.backbone_stages] if config.masks else (f"layer{config.backbone_stages}",),
            padding_invariant=config.padding_invariant,
            norm=config.backbone_norm,
            train_stem=config.train_backbone_stem,
            num_stages=config.backbone_stages,
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
        if config.focal_loss:
            # Start every class at p = 0.01, as with any sigmoid focal loss: otherwise the many
            # background queries dominate the first steps (RetinaNet, Deformable DETR).
            nn.init.constant_(self.class_embed.bias, -math.log((1 - FOCAL_PRIOR) / FOCAL_PRIOR))
        self.bbox_embed = MLP(config.hidden_dim, config.hidden_dim, 4, 3)
        if config.encoder_aux_matches:
            self.encoder_class_embed = nn.Linear(config.hidden_dim, config.num_classes + 1)
            nn.init.constant_(self.encoder_class_embed.bias, -math.log((1 - FOCAL_PRIOR) / FOCAL_PRIOR))
            self.encoder_bbox_embed = MLP(config.hidden_dim, config.hidden_dim, 4, 3)
            nn.init.zeros_(self.encoder_bbox_embed.layers[-1].weight)  # start at each cell's own box
            nn.init.zeros_(self.encoder_bbox_embed.layers[-1].bias)
        if config.semantic_loss_coef:
            self.semantic_embed = nn.Linear(config.hidden_dim, config.num_classes)
        if config.two_stage:
            # The queries come from the encoder: `query_embed` stays (official weights load) but does not train
            # (an unused trainable parameter would stall DDP, which waits for every gradient).
            self.query_embed.requires_grad_(False)
            self.proposal_pos = MLP(config.hidden_dim, config.hidden_dim, config.hidden_dim, 2)
            nn.init.zeros_(self.bbox_embed.layers[-1].weight)  # start at the proposals
            nn.init.zeros_(self.bbox_embed.layers[-1].bias)
        if config.masks:
            self.bbox_attention = MHAttentionMap(config.hidden_dim, config.hidden_dim, config.nheads, dropout=0.0,
                                                 scaled=config.scaled_mask_attention)
            self.mask_head = MaskHeadSmallConv(config.hidden_dim + config.nheads, config.fpn_dims, config.hidden_dim)
            if config.freeze_detector:
                self.freeze_detector()

    MASK_MODULES = ("bbox_attention.", "mask_head.")
    """Name prefixes of the mask head's parameters."""

    inference_settings = None
    """Set on the copies `detr.inference_model` makes (norms folded: they cannot train)."""

    def train(self, mode: bool = True) -> "DETR":
        if mode and self.inference_settings is not None:
            raise RuntimeError("an inference model (detr.inference_model: norms folded into the convolutions) "
                               "cannot train; train the model it was made from")
        return super().train(mode)

    def freeze_detector(self) -> None:
        """Stop gradients to everything but the mask head (the paper's mask-head training)."""
        for name, param in self.named_parameters():
            if not name.startswith(self.MASK_MODULES):
                param.requires_grad_(False)

    @property
    def num_queries(self) -> int:
        return self.config.num_queries

    @property
    def feature_stride(self) -> int:
        """Input pixels per transformer cell: 4 after the stem, doubled by each stage after the first
        (a dilated last stage keeps its input's stride)."""
        stages = self.config.backbone_stages
        return 2 ** (stages + 1) // (2 if self.config.dilation and stages == 4 else 1)

    def forward(self, images: Tensor, mask: Tensor, mask_queries: MaskQueries = None) -> dict:
        if images.ndim != 4 or mask.ndim != 3 or images.shape[0] != mask.shape[0] or images.shape[-2:] != mask.shape[-2:]:
            raise ValueError(
                f"expected images [B,3,H,W] and mask [B,H,W] of the same B, H, W; got "
                f"{tuple(images.shape)} and {tuple(mask.shape)} (use detr.pad_images to build them)"
            )
        features, masks = self.backbone(images, mask)
        src, src_mask = features[-1], masks[-1]
        pos = self.position_encoding(src_mask).to(src.dtype)
        src_proj = self.input_proj(src)
        if self.config.two_stage:
            return self._forward_two_stage(src_proj, src_mask, pos, features, masks, mask, mask_queries)
        hs, memory = self.transformer(src_proj, src_mask, self.query_embed.weight, pos)
        out = self.predict_from_decoder(hs)
        if self.training and self.config.encoder_aux_matches:
            out["enc_outputs"] = self.predict_from_encoder(memory, src_mask)
        if self.training and self.config.semantic_loss_coef:
            out["semantic_outputs"] = self.predict_semantic(memory)
        if self.config.masks:
            out.update(self.predict_masks(out, hs[-1], memory, src_proj, features, masks, mask, mask_queries))
        return out

    def predict_masks(
        self,
        out: dict,
        hs_last: Tensor,
        memory: Tensor,
        src_proj: Tensor,
        features: list[Tensor],
        masks: list[Tensor],
        image_mask: Tensor,
        mask_queries: MaskQueries = None,
    ) -> dict:
        """The mask head over the last decoder layer: `pred_masks` for all or the selected queries."""
        batch, queries = hs_last.shape[:2]
        selected = None
        if mask_queries is not None:
            selected = mask_queries(out) if callable(mask_queries) else mask_queries
            selected = torch.as_tensor(selected, dtype=torch.bool, device=hs_last.device)
            if selected.shape != (batch, queries):
                raise ValueError(f"mask_queries must be a bool [B, Q] = [{batch}, {queries}] selection, "
                                 f"got shape {tuple(selected.shape)}")
        valid = None
        fpn_stages = self.config.fpn_stage_indices
        if self.config.padding_invariant and bool(image_mask.any()):
            valid = [(~m)[:, None].to(src_proj.dtype) for m in [masks[-1]] + [masks[i] for i in fpn_stages]]
        fpns = [features[i] for i in fpn_stages]
        size = features[0].shape[-2:]
        if selected is None:
            rows = torch.arange(batch, device=hs_last.device).repeat_interleave(queries)
            attention = self.bbox_attention(hs_last, memory, mask=masks[-1])
            logits = self.mask_head(src_proj, attention.flatten(0, 1), fpns, rows, valid)
            pred_masks = logits.view(batch, queries, *logits.shape[-2:])
        else:
            rows, cols = selected.nonzero(as_tuple=True)
            pred_masks = src_proj.new_full((batch, queries, *size), UNCOMPUTED_MASK_LOGIT)
            if len(rows):  # none selected (`boxes_only`): the head, attention maps included, does not run
                attention = self.bbox_attention(hs_last, memory, mask=masks[-1])
                logits = self.mask_head(src_proj, attention[rows, cols], fpns, rows, valid)
                pred_masks = pred_masks.index_put((rows, cols), logits[:, 0])
        result = {"pred_masks": pred_masks, "padding_invariant": self.config.padding_invariant}
        if selected is not None:
            result["mask_queries"] = selected
        return result

    def _forward_two_stage(self, src_proj: Tensor, src_mask: Tensor, pos: Tensor, features: list[Tensor],
                           masks: list[Tensor], mask: Tensor, mask_queries: MaskQueries) -> dict:
        memory = self.transformer.encode(src_proj, src_mask, pos)
        enc = self.predict_from_encoder(memory, src_mask)
        scores, classes = enc["pred_logits"][..., :-1].detach().max(-1)  # padding cells sit at -1e4
        count = min(self.num_queries, scores.shape[1])
        top = select_proposals(scores, enc["pred_boxes"].detach(), ~src_mask.flatten(1), count,
                               self.config.proposal_nms, classes if self.config.proposal_nms_per_class else None)
        reference = enc["pred_boxes"].gather(1, top[..., None].expand(-1, -1, 4)).detach()
        if self.config.proposal_content:
            tokens = memory.flatten(2).transpose(1, 2)
            content = tokens.gather(1, top[..., None].expand(-1, -1, tokens.shape[-1])).detach()
        else:
            content = reference.new_zeros(*reference.shape[:2], self.config.hidden_dim)
        hs = self.transformer.decode(memory, src_mask, self.proposal_query_pos(reference), pos, tgt=content)
        out = self.predict_from_decoder(hs, self.refine_boxes(hs, reference))
        if self.training:
            out["enc_outputs"] = enc
            if self.config.semantic_loss_coef:
                out["semantic_outputs"] = self.predict_semantic(memory)
        if self.config.masks:
            out.update(self.predict_masks(out, hs[-1], memory, src_proj, features, masks, mask, mask_queries))
        return out

    def proposal_query_pos(self, boxes: Tensor) -> Tensor:
        """Positional queries [B,Q,C] of reference boxes [B,Q,4] (two-stage)."""
        return self.proposal_pos(box_sine_embedding(boxes, self.config.hidden_dim))

    def refine_boxes(self, hs: Tensor, reference: Tensor) -> Tensor:
        """Boxes from decoder outputs [..., Q, C] as offsets in logit space from `reference` [B,Q,4]."""
        return (self.bbox_embed(hs) + torch.logit(reference.clamp(1e-3, 1 - 1e-3))).sigmoid()

    def predict_semantic(self, memory: Tensor) -> dict:
        """Training only: class logits [B, H*W, num_classes] of every encoder cell (`semantic_loss_coef`)."""
        return {"logits": self.semantic_embed(memory.flatten(2).transpose(1, 2)), "grid": tuple(memory.shape[-2:]),
                "stride": self.feature_stride}

    def predict_from_encoder(self, memory: Tensor, mask: Tensor) -> dict:
        """The dense auxiliary head: a class and a box per encoder cell [B, H*W, ...]. Boxes are
        offsets (in logit space) from the cell's own box: centred on the cell, two cells wide,
        in the image's own (unpadded) normalised coordinates."""
        batch, _, height, width = memory.shape
        valid = ~mask
        valid_h = valid[:, :, 0].sum(1).clamp(min=1).to(memory.dtype)
        valid_w = valid[:, 0, :].sum(1).clamp(min=1).to(memory.dtype)
        ys = (torch.arange(height, device=memory.device, dtype=memory.dtype) + 0.5)[None, :, None] / valid_h[:, None, None]
        xs = (torch.arange(width, device=memory.device, dtype=memory.dtype) + 0.5)[None, None, :] / valid_w[:, None, None]
        cells = torch.stack([xs.expand(batch, height, width), ys.expand(batch, height, width),
                             (2 / valid_w)[:, None, None].expand(batch, height, width),
                             (2 / valid_h)[:, None, None].expand(batch, height, width)], dim=-1)
        reference = torch.logit(cells.flatten(1, 2).clamp(1e-3, 1 - 1e-3))
        tokens = memory.flatten(2).transpose(1, 2)
        logits = self.encoder_class_embed(tokens)
        logits = logits.masked_fill(mask.flatten(1)[..., None], -1e4)  # padding is never an object
        boxes = (reference + self.encoder_bbox_embed(tokens)).sigmoid()
        return {"pred_logits": logits, "pred_boxes": boxes, "matches_per_target": self.config.encoder_aux_matches,
                "grid": (height, width), "stride": self.feature_stride}

    def predict_from_decoder(self, hs: Tensor, boxes: Tensor | None = None) -> dict:
        """Class and box heads over every decoder layer's output [L,B,Q,C]; `boxes` [L,B,Q,4] when the
        caller has them already (two-stage: offsets from reference boxes)."""
        logits = self.class_embed(hs)
        if boxes is None:
            boxes = self.bbox_embed(hs).sigmoid()
        out: dict = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.config.focal_loss:
            out["sigmoid_scores"] = True  # how post-processing turns these logits into scores
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
