"""`DETRConfig`: the one place where the model's hyper-parameters and their defaults live.

The defaults are the paper's (Carion et al. 2020, and the official implementation's
`main.py`): ResNet-50, sine positional encoding, a 6+6-layer post-norm transformer of
width 256 with 8 heads, 100 object queries, auxiliary decoding losses, Hungarian
matching costs class 1 / L1 5 / GIoU 2 and the same loss weights, no-object weight 0.1.

`num_classes` follows the official rule: it is the **largest category id + 1**, not
the number of categories. COCO's ids run to 90, so COCO uses 91; a dataset whose
only category has id 1 uses 2. The classifier has `num_classes + 1` outputs, the
last being "no object".
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import RaydetrError

RESNET_CHANNELS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}
"""Output channels of each supported backbone's last stage."""

RESNET_STAGE_CHANNELS = {
    "resnet18": (64, 128, 256, 512),
    "resnet34": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
    "resnet101": (256, 512, 1024, 2048),
}
"""Output channels of layer1..layer4 of each backbone (the mask head's FPN inputs are layer3, 2, 1)."""

MASK_HEAD_GROUPS = 8
"""GroupNorm groups of every mask-head layer (the official head's constant)."""

BOTTLENECK_BACKBONES = frozenset({"resnet50", "resnet101"})
"""Backbones built from bottleneck blocks: the only ones torchvision can dilate (DC5)."""

PANOPTIC_THRESHOLD = 0.85
"""The paper's panoptic keep threshold: a query takes part in the panoptic merge when its top class
probability exceeds it (the default of every job's `--panoptic-threshold`)."""

POSITION_EMBEDDINGS = ("sine", "learned")
BACKBONE_NORMS = ("frozen", "batch")


@dataclass(frozen=True)
class FocalLoss:
    """Classify with a sigmoid focal loss over the real classes and match with the focal cost (Deformable
    DETR) instead of softmax cross-entropy. The class head keeps its num_classes + 1 outputs (the last goes
    unused), so the layout is the official one; it starts every class at p = 0.01, and detections are
    scored with sigmoids. Part of `recipe: fast`."""

    alpha: float = 0.25
    gamma: float = 2.0


@dataclass(frozen=True)
class DenseHead:
    """A dense head on the encoder output that predicts a class and a box at every feature cell (relative
    to the cell), each target matched to `matches` cells (one-to-many, as Co-DETR's and H-DETR's auxiliary
    branches): direct, plentiful supervision that teaches a backbone trained from scratch to localise.
    Losses suffixed `_enc`; needs `focal`. Training-only unless `two_stage` reads it. Part of `recipe: fast`."""

    matches: int = 2
    mask_assignment: bool = False
    """With targets that carry masks (panoptic training): each target keeps its `matches` best-matched cells
    (weight 1 each), and every other cell whose centre lies inside its mask becomes its positive too (a cell
    inside several masks goes to the smallest), these sharing a further weight of `matches`. A stuff region
    then teaches its cells its class instead of "background" (`detr.mask_assignment`)."""


@dataclass(frozen=True)
class TwoStage:
    """Decoder queries from the encoder (Deformable DETR's two-stage): the dense head's best `num_queries`
    cells become the queries, their boxes (through a sine embedding and a small MLP) the positional queries,
    and the decoder predicts boxes relative to them: it starts from proposals instead of learning where to
    look. Needs `dense_head`, which then runs at inference too; not exportable to the official layout.
    Part of `recipe: fast`."""

    nms: float = 0.0
    """> 0: cells whose box overlaps a better-scored cell's box by more than this IoU are passed over
    (class-agnostic NMS of the proposals, as Efficient DETR and DETA select them). The dense head is trained
    one-to-many, so several cells find each object; without this, several queries start on one object and
    the decoder needs many steps to learn that only one may claim it. If fewer than `num_queries` survive,
    the best suppressed cells fill the rest. 0: plain top-k."""
    nms_per_class: bool = False
    """With `nms`: a cell suppresses only cells whose best class is its own, for data where objects of
    different classes share a box (panoptic stuff regions that both span the image)."""
    content: bool = False
    """Each query's content starts as its proposal cell's encoder feature (detached, as RT-DETR does)
    instead of zeros: a positional query made from a box alone cannot tell two proposals with the same box
    apart, nor say what the cell saw."""


@dataclass(frozen=True)
class RoIRefine:
    """Correct each final box from the backbone features inside it (`detr.roi_refine`): `stage`'s output
    (1: stride 4) pooled `pooled` x `pooled` over the box, an offset predicted from it and the query. The
    refined boxes are the model's; the decoder's own become an auxiliary output. Part of `recipe: fast`."""

    stage: int = 1
    pooled: int = 7


@dataclass(frozen=True)
class MaskHead:
    """The paper's mask head (section 4.4) on top of the detector (`detr.segmentation.DETRsegm`): attention
    maps of each decoder output over the encoder memory, then an FPN-like convolutional head; the model also
    returns "pred_masks" [B, Q, H/4, W/4] logits and the criterion adds `loss_mask` and `loss_dice`."""

    freeze_detector: bool = True
    """Train only the mask head (the paper's recipe on top of a trained detector); False trains detector
    and mask head jointly."""
    scaled_attention: bool = False
    """Multiply the attention maps by the number of (head, position) cells they span, so they average 1
    instead of 1/cells. The official maps are about 1e-3 beside features of about 1, and the head learns to
    tell queries apart only after a long plateau; scaled, it does from the first hundreds of steps. No new
    weights: official checkpoints load. Part of `recipe: fast`."""
    mask_loss_coef: float = 1.0
    """Weight of the sigmoid focal loss on matched masks (`loss_mask`)."""
    dice_loss_coef: float = 1.0
    """Weight of the dice loss on matched masks (`loss_dice`)."""


@dataclass(frozen=True)
class SemanticHead:
    """With targets that carry masks (panoptic training), a training-only linear head classifies every
    encoder cell as the segment covering its centre, by cross-entropy averaged over the labelled cells
    (`loss_semantic`, at `loss_coef`): stuff classes (textures) separate early (`detr.semantic_cells`)."""

    loss_coef: float = 2.0


PARTS: dict[str, type] = {"focal": FocalLoss, "dense_head": DenseHead, "two_stage": TwoStage,
                          "roi_refine": RoIRefine, "mask_head": MaskHead, "semantic_head": SemanticHead}
"""The optional parts of a model: a field of `DETRConfig` each, None when the part is left out."""


@dataclass(frozen=True)
class DETRConfig:
    """Hyper-parameters of a DETR model, its matcher and its losses. The optional parts (`PARTS`) are
    nested configs; None leaves the part out, which is the paper's model."""

    num_classes: int = 91
    """Largest category id + 1 (COCO: 91). The class head has num_classes + 1 logits."""

    # Backbone
    backbone: str = "resnet50"
    dilation: bool = False
    """Dilate the last ResNet stage instead of striding (the paper's DC5 models)."""
    train_backbone: bool = True
    """Train stages 2-4 of the backbone (the stem and stage 1 always stay frozen)."""
    backbone_weights: str | None = None
    """Optional path to a torchvision ResNet state dict (e.g. ImageNet weights) loaded at build time."""
    padding_invariant: bool = True
    """Compute each image of a padded batch exactly as if it were alone (see `backbone.py`);
    False reproduces the official implementation, whose features near padding depend on it."""
    backbone_norm: str = "frozen"
    """"frozen" (the paper: fixed statistics, right for pretrained weights) or "batch": batch norm
    that trains, for a backbone learning from scratch; in eval mode it is the frozen layer with the
    learnt statistics (same checkpoint keys). Part of `recipe: fast`."""
    train_backbone_stem: bool = False
    """Also train the stem and stage 1, which the paper keeps frozen (pretrained edge filters);
    a random backbone needs them to learn. Part of `recipe: fast`."""
    backbone_stages: int = 4
    """ResNet stages used: 4 (the paper, stride 32), 3 (stride 16, half the channels) or 2 (stride
    8, a quarter): cheaper and finer features for small images; a different model, not for
    official weights. Part of `recipe: fast`."""

    # Positional encoding and transformer
    position_embedding: str = "sine"
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    pre_norm: bool = False
    num_queries: int = 100
    aux_loss: bool = True
    """Supervise every decoder layer (losses suffixed `_0`, `_1`, ...), as the paper does."""

    # Hungarian matcher costs
    set_cost_class: float = 1.0
    set_cost_bbox: float = 5.0
    set_cost_giou: float = 2.0

    # Loss weights
    ce_loss_coef: float = 1.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    eos_coef: float = 0.1
    """Relative classification weight of the no-object class (softmax classification only)."""

    # Optional parts (None: left out)
    focal: FocalLoss | None = None
    dense_head: DenseHead | None = None
    two_stage: TwoStage | None = None
    roi_refine: RoIRefine | None = None
    mask_head: MaskHead | None = None
    semantic_head: SemanticHead | None = None

    def __post_init__(self) -> None:
        for name, kind in PARTS.items():
            value = getattr(self, name)
            if isinstance(value, Mapping):  # from YAML or JSON
                object.__setattr__(self, name, _part(kind, value, name))
            elif value is not None and not isinstance(value, kind):
                raise RaydetrError(f"invalid DETRConfig: {name} must be a {kind.__name__}, a mapping or None, "
                                 f"got {value!r}")
        problems = self._problems()
        if problems:
            raise RaydetrError("invalid DETRConfig: " + "; ".join(problems))

    @property
    def masks(self) -> bool:
        """Whether the model has the mask head."""
        return self.mask_head is not None

    def _problems(self) -> list[str]:
        problems = []
        if self.backbone not in RESNET_CHANNELS:
            problems.append(f"backbone {self.backbone!r} is not one of {sorted(RESNET_CHANNELS)}")
        elif self.dilation and self.backbone not in BOTTLENECK_BACKBONES:
            problems.append(
                f"dilation (DC5) needs a bottleneck backbone ({sorted(BOTTLENECK_BACKBONES)}); "
                f"{self.backbone} uses basic blocks, which torchvision cannot dilate"
            )
        if self.backbone_norm not in BACKBONE_NORMS:
            problems.append(f"backbone_norm {self.backbone_norm!r} is not one of {BACKBONE_NORMS}")
        if self.backbone_norm == "batch" and not self.train_backbone:
            problems.append('backbone_norm="batch" trains the backbone\'s norms: it needs train_backbone=True')
        if self.train_backbone_stem and not self.train_backbone:
            problems.append("train_backbone_stem needs train_backbone=True")
        if self.backbone_stages not in (2, 3, 4):
            problems.append(f"backbone_stages must be 2, 3 or 4, got {self.backbone_stages}")
        elif self.backbone_stages < 4 and self.dilation:
            problems.append(f"dilation (DC5) dilates stage 4, which backbone_stages={self.backbone_stages} leaves out")
        if self.position_embedding not in POSITION_EMBEDDINGS:
            problems.append(f"position_embedding {self.position_embedding!r} is not one of {POSITION_EMBEDDINGS}")
        if self.num_classes < 1:
            problems.append(f"num_classes must be >= 1 (largest category id + 1), got {self.num_classes}")
        for name in ("hidden_dim", "nheads", "dec_layers", "dim_feedforward", "num_queries"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.enc_layers < 0:
            problems.append(f"enc_layers must be >= 0, got {self.enc_layers}")
        if self.nheads >= 1 and self.hidden_dim % self.nheads:
            problems.append(f"hidden_dim {self.hidden_dim} is not divisible by nheads {self.nheads}")
        if self.hidden_dim % 2:
            problems.append(f"hidden_dim must be even for the 2-D positional encoding, got {self.hidden_dim}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if self.set_cost_class == 0 and self.set_cost_bbox == 0 and self.set_cost_giou == 0:
            problems.append("the matcher costs cannot all be 0")
        if self.focal is not None and (not 0.0 < self.focal.alpha < 1.0 or self.focal.gamma < 0):
            problems.append(f"focal alpha must be in (0, 1) and gamma >= 0, got {self.focal}")
        if self.dense_head is not None:
            if self.dense_head.matches < 1:
                problems.append(f"dense_head.matches must be >= 1, got {self.dense_head.matches}")
            if self.focal is None:
                problems.append("dense_head needs focal (its many background cells need the focal loss)")
            if self.enc_layers == 0:
                problems.append("dense_head needs an encoder (enc_layers >= 1)")
        if self.two_stage is not None:
            if self.dense_head is None:
                problems.append("two_stage takes its queries from the dense encoder head: it needs dense_head")
            if not 0.0 <= self.two_stage.nms < 1.0:
                problems.append(f"two_stage.nms is an IoU threshold in [0, 1), got {self.two_stage.nms}")
            elif self.two_stage.nms_per_class and not self.two_stage.nms:
                problems.append("two_stage.nms_per_class says how two_stage.nms suppresses: it needs nms > 0")
        if self.roi_refine is not None:
            if not 1 <= self.roi_refine.stage <= self.backbone_stages:
                problems.append(f"roi_refine.stage must be a stage the backbone has (1..{self.backbone_stages}), "
                                f"got {self.roi_refine.stage}")
            if self.roi_refine.pooled < 1:
                problems.append(f"roi_refine.pooled must be >= 1, got {self.roi_refine.pooled}")
        if self.semantic_head is not None and self.semantic_head.loss_coef <= 0:
            problems.append(f"semantic_head.loss_coef must be > 0, got {self.semantic_head.loss_coef}")
        if self.masks and self.hidden_dim >= 1 and self.nheads >= 1:
            # The official mask head: GroupNorm(8) over hidden+nheads channels, then hidden/2 ... hidden/16.
            if (self.hidden_dim + self.nheads) % MASK_HEAD_GROUPS or self.hidden_dim % (16 * MASK_HEAD_GROUPS):
                problems.append(
                    f"masks need hidden_dim a multiple of {16 * MASK_HEAD_GROUPS} and hidden_dim + nheads a "
                    f"multiple of {MASK_HEAD_GROUPS} (the mask head's GroupNorm groups); got hidden_dim "
                    f"{self.hidden_dim}, nheads {self.nheads}"
                )
        return problems

    @property
    def backbone_channels(self) -> int:
        """Channels of the last backbone stage used (each stage has twice the channels of the one before)."""
        return RESNET_CHANNELS[self.backbone] // 2 ** (4 - self.backbone_stages)

    @property
    def fpn_stage_indices(self) -> tuple[int, int, int]:
        """Which backbone stages (0 = layer1, stride 4) feed the mask head's three FPN steps: the
        stride-16, 8 and 4 features as in the paper; a 2-stage backbone (transformer at stride 8) has
        no stride-16 feature, so its first two steps both take the stride-8 one."""
        return (2, 1, 0) if self.backbone_stages >= 3 else (1, 1, 0)

    @property
    def fpn_dims(self) -> tuple[int, int, int]:
        """Channels of the mask head's FPN inputs: 1024/512/256 for ResNet-50/101, 256/128/64 for
        ResNet-18/34 (128/128/64 with a 2-stage backbone)."""
        channels = RESNET_STAGE_CHANNELS[self.backbone]
        return tuple(channels[i] for i in self.fpn_stage_indices)

    def replace(self, **changes: Any) -> "DETRConfig":
        """A copy with some fields changed (validated like a new config)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form, safe for JSON, YAML, MLflow params and `torch.load(weights_only=True)`."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "DETRConfig":
        """Build from a mapping (parts as nested mappings); unknown keys are an error naming them (typos must
        not pass silently). The flat layout of checkpoints saved before the parts were nested is read too
        (`detr.legacy_config`); removed options (`RETIRED_OPTIONS`) are accepted while they hold their "off"
        value, and switched on they are an error."""
        from .legacy_config import nest_flat_options

        values = nest_flat_options(values)
        for name, off in RETIRED_OPTIONS.items():
            if name in values:
                value = values.pop(name)
                if off is not None and value != off:
                    raise RaydetrError(f"{name}={value!r} was removed from raydetr (see docs/experiments.md for what it "
                                     f"measured and the commit that holds its code); this model cannot be built")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise RaydetrError(f"unknown DETRConfig field(s): {unknown}; known fields: {sorted(known)}")
        return cls(**dict(values))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "DETRConfig":
        """One of the named presets (see `PRESETS`), optionally with fields overridden."""
        try:
            base = PRESETS[name]
        except KeyError:
            raise RaydetrError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}") from None
        return base.replace(**overrides) if overrides else base


def _part(kind: type, values: Mapping[str, Any], name: str) -> Any:
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise RaydetrError(f"invalid DETRConfig: unknown {name} field(s) {unknown}; known: {sorted(known)}")
    return kind(**values)


RETIRED_OPTIONS: dict[str, Any] = {
    "query_groups": 1, "box_refine": False, "denoising_groups": 0, "denoising_label_noise": None,
    "denoising_box_noise": None, "set_cost_mask": 0.0, "set_cost_dice": 0.0,
}
"""Options removed after they lost in our screens, with their "off" value (None: any value, a setting
of an option that was off anyway)."""

PRESETS: dict[str, DETRConfig] = {
    "detr_r50": DETRConfig(),
    "detr_r50_dc5": DETRConfig(dilation=True),
    "detr_r101": DETRConfig(backbone="resnet101"),
    "detr_r101_dc5": DETRConfig(backbone="resnet101", dilation=True),
    # Small enough to train and test on 2 CPU cores with 64-128 px images.
    "tiny": DETRConfig(
        backbone="resnet18",
        hidden_dim=64,
        nheads=4,
        enc_layers=2,
        dec_layers=2,
        dim_feedforward=128,
        num_queries=10,
    ),
    # The smallest model the official mask head allows (hidden_dim a multiple of 128), for tests and CPU demos.
    "tiny_panoptic": DETRConfig(
        backbone="resnet18",
        hidden_dim=128,
        nheads=8,
        enc_layers=2,
        dec_layers=2,
        dim_feedforward=256,
        num_queries=20,
        mask_head=MaskHead(),
    ),
}
"""Named configurations: the paper's four COCO models, `tiny` for tests and `tiny_panoptic` (with masks)."""

__all__ = ["DETRConfig", "PRESETS", "PARTS", "FocalLoss", "DenseHead", "TwoStage", "MaskHead", "SemanticHead", "RESNET_CHANNELS", "RESNET_STAGE_CHANNELS", "BOTTLENECK_BACKBONES",
           "MASK_HEAD_GROUPS", "BACKBONE_NORMS"]
