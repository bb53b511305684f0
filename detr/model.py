"""The DETR detector, assembled from parts: backbone -> transformer -> set of (class, box) predictions.

`build_model(config)` chooses the parts once, as the official code and torchvision build their
models: the backbone, the positional encoding, the transformer, where the decoder's queries come
from (learned embeddings, the paper's; or `detr.proposals.EncoderProposals`, two-stage), and the
training-only heads (`detr.dense_head.DenseEncoderHead`, `detr.semantic_cells.SemanticHead`). A
model with masks is this detector inside `detr.segmentation.DETRsegm`, as in the official code.

Forward contract: `model(images, mask)` with `images` float [B,3,H,W] (ImageNet-normalised,
zero-padded at the bottom and right; see `pad_images`) and `mask` bool [B,H,W], True on padding.
It returns

- `"pred_logits"` [B, Q, num_classes + 1]: class logits, the last being "no object";
- `"pred_boxes"` [B, Q, 4]: boxes as normalised (cx, cy, w, h) in [0, 1], relative
  to each image's own (unpadded) size;
- `"aux_outputs"`: the same two entries for every decoder layer but the last
  (when `aux_loss` is on), for the auxiliary losses;
- in training, `"enc_outputs"` (with a dense head): its `pred_logits` and `pred_boxes` for every
  encoder cell [B, H*W, ...], padding cells scored as certain background, and the cells' `grid`
  and `stride`; `"semantic_outputs"` (with a semantic head): its per-cell logits.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

from torch import Tensor, nn

from .backbone import STAGES, Backbone, stage_stride
from .config import RESNET_STAGE_CHANNELS, DETRConfig
from .dense_head import DenseEncoderHead
from .heads import MLP, start_at_focal_prior, start_at_reference
from .position_encoding import build_position_encoding
from .proposals import EncoderProposals
from .roi_refine import RoIBoxRefiner
from .semantic_cells import SemanticHead
from .transformer import Transformer

MaskQueries = Tensor | Callable[[dict], Tensor] | None

TRAINING_ONLY_PREFIXES = ("dense_head.", "semantic_head.")
"""State-dict entries that only training uses (absent from official checkpoints and exports)."""

NON_OFFICIAL_PREFIXES = TRAINING_ONLY_PREFIXES + ("proposals.", "refiner.")
"""Weights of our parts, absent from official checkpoints: they start fresh when official (or
detection-only) weights are loaded into a model that has them."""


class Features(NamedTuple):
    """What the detector computed on the way, for the mask head: backbone stage outputs and their padding
    masks, the projected last stage, the encoder memory and the last decoder layer's output."""

    features: list[Tensor]
    masks: list[Tensor]
    src_proj: Tensor
    memory: Tensor
    decoded: Tensor


def boxes_only(outputs: dict) -> Tensor:
    """A `mask_queries` selection of no query: a model with a mask head then gives its detections
    without the head's per-query cost (box evaluation, detection labelling); a detector ignores it."""
    logits = outputs["pred_logits"]
    return logits.new_zeros(logits.shape[:2], dtype=bool)


class InferenceGuard(nn.Module):
    """A model that `detr.inference_model` may turn into an inference copy, which must never train."""

    inference_settings = None
    """Set on the copies `detr.inference_model` makes (norms folded: they cannot train)."""

    def train(self, mode: bool = True) -> "InferenceGuard":
        if mode and self.inference_settings is not None:
            raise RuntimeError("an inference model (detr.inference_model: norms folded into the convolutions) "
                               "cannot train; train the model it was made from")
        return super().train(mode)


class DETR(InferenceGuard):
    """DEtection TRansformer. Parameter names follow the official checkpoints where the part is official."""

    def __init__(self, backbone: Backbone, position_encoding: nn.Module, transformer: Transformer, num_classes: int,
                 num_queries: int, aux_loss: bool = True, proposals: EncoderProposals | None = None,
                 dense_head: DenseEncoderHead | None = None, semantic_head: SemanticHead | None = None,
                 refiner: RoIBoxRefiner | None = None, refine_features: int = 0) -> None:
        """`proposals` None: the decoder's queries are the learned `query_embed` (the paper's); else they come
        from the dense head's best cells, and `query_embed` stays (official weights load) untrained. `refiner`
        corrects the final boxes from the backbone output `features[refine_features]`."""
        super().__init__()
        hidden = transformer.d_model
        self.backbone = backbone
        self.position_encoding = position_encoding
        self.input_proj = nn.Conv2d(backbone.num_channels, hidden, kernel_size=1)
        self.transformer = transformer
        self.query_embed = nn.Embedding(num_queries, hidden)
        self.class_embed = nn.Linear(hidden, num_classes + 1)
        self.bbox_embed = MLP(hidden, hidden, 4, 3)
        self.proposals = proposals
        self.dense_head = dense_head
        self.semantic_head = semantic_head
        self.refiner, self.refine_features = refiner, refine_features
        self.aux_loss = aux_loss
        self.num_queries = num_queries

    config: DETRConfig
    """The config `build_model` built it from (what checkpoints store)."""

    def forward(self, images: Tensor, mask: Tensor, mask_queries: MaskQueries = None) -> dict:
        """The outputs described in the module docstring; `mask_queries` is read by a mask head around this
        model (`DETRsegm`), so that every caller may pass one."""
        return self.forward_features(images, mask)[0]

    def forward_features(self, images: Tensor, mask: Tensor) -> tuple[dict, Features]:
        """The outputs, and the features a mask head reads."""
        if images.ndim != 4 or mask.ndim != 3 or images.shape[0] != mask.shape[0] or images.shape[-2:] != mask.shape[-2:]:
            raise ValueError(
                f"expected images [B,3,H,W] and mask [B,H,W] of the same B, H, W; got "
                f"{tuple(images.shape)} and {tuple(mask.shape)} (use detr.pad_images to build them)"
            )
        features, masks = self.backbone(images, mask)
        src_mask = masks[-1]
        pos = self.position_encoding(src_mask).to(features[-1].dtype)
        src_proj = self.input_proj(features[-1])
        memory = self.transformer.encode(src_proj, src_mask, pos)
        dense = self.dense_head(memory, src_mask) if self.dense_head and (self.training or self.proposals) else None
        if self.proposals is None:
            decoded = self.transformer.decode(memory, src_mask, self.query_embed.weight, pos)
            out = self.predict(decoded, self.bbox_embed(decoded).sigmoid())
        else:
            query_pos, content, reference = self.proposals(memory, src_mask, dense)
            decoded = self.transformer.decode(memory, src_mask, query_pos, pos, tgt=content)
            out = self.predict(decoded, (self.bbox_embed(decoded) + reference.clamp(1e-3, 1 - 1e-3).logit()).sigmoid())
        if self.refiner is not None:
            refined = self.refiner(features[self.refine_features], mask, out["pred_boxes"], decoded[-1])
            if self.aux_loss:
                out["aux_outputs"].append({"pred_logits": out["pred_logits"], "pred_boxes": out["pred_boxes"]})
            out["pred_boxes"] = refined
        if self.training:
            out.update(self.training_outputs(memory, dense))
        return out, Features(features, masks, src_proj, memory, decoded[-1])

    def predict(self, decoded: Tensor, boxes: Tensor) -> dict:
        """Class logits of every decoder layer's output [L,B,Q,C] beside its boxes [L,B,Q,4]."""
        logits = self.class_embed(decoded)
        out: dict = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
        return out

    def training_outputs(self, memory: Tensor, dense: dict | None) -> dict:
        """What the training-only heads predict, for their losses."""
        out = {} if dense is None else {"enc_outputs": dense}
        if self.semantic_head is not None:
            out["semantic_outputs"] = self.semantic_head(memory)
        return out


def build_detector(config: DETRConfig) -> DETR:
    """The detector `config` describes, its parts chosen here and nowhere else."""
    last = f"layer{config.backbone_stages}"
    refine_stage = config.roi_refine and f"layer{config.roi_refine.stage}"
    # The mask head also reads the stride-4, 8 and 16 features; the box refiner its stage's.
    stages = STAGES[: config.backbone_stages] if config.masks else tuple(sorted({refine_stage or last, last}))
    backbone = Backbone(
        config.backbone,
        config.dilation,
        config.train_backbone,
        return_stages=stages,
        padding_invariant=config.padding_invariant,
        norm=config.backbone_norm,
        train_stem=config.train_backbone_stem,
        num_stages=config.backbone_stages,
    )
    if config.backbone_weights:
        backbone.load_torchvision_weights(config.backbone_weights)
    transformer = Transformer(config.hidden_dim, config.nheads, config.enc_layers, config.dec_layers,
                              config.dim_feedforward, config.dropout, config.pre_norm)
    hidden, classes = config.hidden_dim, config.num_classes
    two_stage = config.two_stage
    model = DETR(
        backbone, build_position_encoding(config.position_embedding, hidden), transformer, classes,
        config.num_queries, config.aux_loss,
        proposals=two_stage and EncoderProposals(hidden, config.num_queries, two_stage.nms, two_stage.nms_per_class,
                                                 two_stage.content),
        dense_head=config.dense_head and DenseEncoderHead(hidden, classes, backbone.stride),
        semantic_head=config.semantic_head and SemanticHead(hidden, classes, backbone.stride),
        refiner=config.roi_refine and RoIBoxRefiner(RESNET_STAGE_CHANNELS[config.backbone][config.roi_refine.stage - 1],
                                                    hidden, stage_stride(config.roi_refine.stage, config.dilation),
                                                    config.roi_refine.pooled),
        refine_features=stages.index(refine_stage) if refine_stage else 0,
    )
    if config.focal is not None:
        start_at_focal_prior(model.class_embed)
    if two_stage is not None:
        # An unused trainable parameter would stall DDP, which waits for every gradient.
        model.query_embed.requires_grad_(False)
        start_at_reference(model.bbox_embed)  # boxes start at the proposals
    model.config = config
    return model


def build_model(config: DETRConfig | str = "detr_r50", **overrides) -> nn.Module:
    """A randomly initialised model from a config or a preset name (with optional overrides): the detector,
    inside the mask head when the config has one (`detr.segmentation.DETRsegm`)."""
    if isinstance(config, str):
        config = DETRConfig.preset(config, **overrides)
    elif overrides:
        config = config.replace(**overrides)
    detector = build_detector(config)
    if config.mask_head is None:
        return detector
    from .segmentation import DETRsegm

    return DETRsegm(detector, config)


def detector_of(model: nn.Module) -> DETR:
    """The detector itself: the model, or the one inside a mask head."""
    return getattr(model, "detr", model)
