"""The set-prediction loss: Hungarian matching, then per-pair class and box losses.

Loss names are the official implementation's, so users recognise them: `loss_ce` (the
classification part chosen at build time, `detr.class_losses`: weighted cross-entropy with the
no-object class down-weighted by `eos_coef`, or the sigmoid focal loss), `loss_bbox` (L1 on
normalised cxcywh boxes), `loss_giou` (1 - generalised IoU), and the logged-only `class_error`
and `cardinality_error`; with auxiliary losses, every decoder layer but the last adds the same
terms with the suffix `_0`, `_1`, ... With a mask head, the last layer's matched masks add
`loss_mask` and `loss_dice` (`detr.mask_losses`; the official code computes no auxiliary mask
losses either), and targets carry "masks" [N, h, w] at the image's own (processed) size.

The training-only heads add their own terms, each a part of its own: the dense encoder head's
one-to-many `_enc` terms (`DenseHeadLoss`) and the per-cell `loss_semantic` (`SemanticLoss`).

Normalisation is global across distributed workers: box losses are divided by the number of
target boxes averaged over workers (as in the official code), and the cross-entropy by the sum of
class weights averaged over workers (the official code uses each worker's own sum, which differs
when workers see different numbers of objects). With DDP averaging gradients, N workers with 1/N
of the batch each then compute exactly the loss and gradients of one worker with the whole batch.
In a single process both are identical to the official definitions.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou_loss

from .class_losses import CrossEntropyClasses, FocalClasses
from .config import DETRConfig
from .distributed import all_reduce_mean
from .errors import RaydetrError
from .mask_assignment import mask_assignment
from .mask_losses import mask_losses_official, mask_losses_per_image, matched_pairs
from .matcher import HungarianMatcher, MatchIndices
from .semantic_cells import semantic_cell_loss

MaskLoss = Callable[[Tensor, Sequence[Mapping], MatchIndices], tuple[Tensor, Tensor]]


def loss_weights(config: DETRConfig) -> dict[str, float]:
    """Weight of each loss term in the total loss, including the auxiliary `_i` copies."""
    base = {"loss_ce": config.ce_loss_coef, "loss_bbox": config.bbox_loss_coef, "loss_giou": config.giou_loss_coef}
    weights = dict(base)
    if config.aux_loss:
        for i in range(config.dec_layers - 1):
            weights.update({f"{k}_{i}": v for k, v in base.items()})
    if config.dense_head is not None:
        weights.update({f"{k}_enc": v for k, v in base.items()})
    if config.mask_head is not None:
        weights.update({"loss_mask": config.mask_head.mask_loss_coef, "loss_dice": config.mask_head.dice_loss_coef})
    if config.semantic_head is not None:
        weights["loss_semantic"] = config.semantic_head.loss_coef
    return weights


class SetCriterion(nn.Module):
    """Computes DETR's losses for a batch; `total` combines them with `weight_dict`."""

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: Mapping[str, float],
                 eos_coef: float = 0.1, classes: CrossEntropyClasses | FocalClasses | None = None,
                 mask_loss: MaskLoss | None = None, extra_losses: Sequence[nn.Module] = ()) -> None:
        """`classes`: how predictions are classified (None: the paper's cross-entropy); `mask_loss`: the mask
        losses' geometry (None: a detector); `extra_losses`: the training-only heads' terms, each called with
        (outputs, targets, norms, this criterion)."""
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.classes = classes or CrossEntropyClasses(num_classes, eos_coef)
        self.eos_coef = eos_coef
        self.mask_loss = mask_loss
        self.extra_losses = nn.ModuleList(extra_losses)

    @classmethod
    def from_config(cls, config: DETRConfig) -> "SetCriterion":
        focal = config.focal
        matcher = HungarianMatcher(config.set_cost_class, config.set_cost_bbox, config.set_cost_giou,
                                   focal and (focal.alpha, focal.gamma))
        classes = (CrossEntropyClasses(config.num_classes, config.eos_coef) if focal is None
                   else FocalClasses(config.num_classes, focal.alpha, focal.gamma))
        mask_loss = None
        if config.mask_head is not None:
            mask_loss = mask_losses_per_image if config.padding_invariant else mask_losses_official
        extra = ([DenseHeadLoss(config.dense_head.matches, config.dense_head.mask_assignment)]
                 if config.dense_head is not None else [])
        extra += [SemanticLoss()] if config.semantic_head is not None else []
        return cls(config.num_classes, matcher, loss_weights(config), config.eos_coef, classes, mask_loss, extra)

    @property
    def computes_masks(self) -> bool:
        """Whether the loss reads masks (the model must compute the matched queries')."""
        return self.mask_loss is not None

    # -- individual losses -------------------------------------------------------------
    def loss_labels(self, outputs: Mapping, targets: Sequence[Mapping], indices: MatchIndices, norms: dict,
                    log: bool = True, weights: Tensor | None = None) -> dict[str, Tensor]:
        """`weights`: one per matched prediction (in `indices` order) scaling its term; unmatched ones weigh 1."""
        logits = outputs["pred_logits"]
        idx = matched_pairs(indices)
        matched_classes = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).long()
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[idx] = matched_classes
        cell_weights = None if weights is None else torch.ones(logits.shape[:2], device=logits.device).index_put(
            idx, weights.to(logits.device, torch.float32))
        losses = {"loss_ce": self.classes.loss(logits, target_classes, cell_weights, norms)}
        if log:
            scored = self.classes.real_class_logits(logits[idx])
            correct = (scored.argmax(-1) == matched_classes).float().mean() if len(matched_classes) else 1.0
            losses["class_error"] = torch.as_tensor(100.0 - 100.0 * correct, device=logits.device)
        return losses

    @torch.no_grad()
    def loss_cardinality(self, outputs: Mapping, targets: Sequence[Mapping], indices: MatchIndices,
                         norms: dict) -> dict[str, Tensor]:
        """Mean absolute error of the number of non-"no object" predictions (logged, not trained)."""
        logits = outputs["pred_logits"]
        target_counts = torch.as_tensor([len(t["labels"]) for t in targets], device=logits.device, dtype=torch.float)
        return {"cardinality_error": F.l1_loss(self.classes.predicted_objects(logits), target_counts)}

    def loss_boxes(self, outputs: Mapping, targets: Sequence[Mapping], indices: MatchIndices, norms: dict,
                   weights: Tensor | None = None) -> dict[str, Tensor]:
        """`weights`: one per matched prediction (in `indices` order) scaling its terms."""
        src_boxes = outputs["pred_boxes"][matched_pairs(indices)].float()
        target_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)], dim=0).to(src_boxes)
        scale = torch.ones(len(src_boxes), device=src_boxes.device) if weights is None else weights.to(src_boxes)
        loss_bbox = (F.l1_loss(src_boxes, target_boxes, reduction="none").sum(1) * scale).sum()
        loss_giou = (generalized_box_iou_loss(
            box_convert(src_boxes, "cxcywh", "xyxy"), box_convert(target_boxes, "cxcywh", "xyxy"), reduction="none"
        ) * scale).sum()
        return {"loss_bbox": loss_bbox / norms["num_boxes"], "loss_giou": loss_giou / norms["num_boxes"]}

    def loss_masks(self, outputs: Mapping, targets: Sequence[Mapping], indices: MatchIndices,
                   norms: dict) -> dict[str, Tensor]:
        """Focal and dice losses of the matched masks against the targets' "masks" [N, h, w]."""
        if "pred_masks" not in outputs:
            raise ValueError("the mask losses need outputs with 'pred_masks' (a model built with a mask head)")
        if any("masks" not in t for t in targets):
            raise ValueError("the mask losses need targets with 'masks' [N, h, w] (binary, at the image's size)")
        focal, dice = self.mask_loss(outputs["pred_masks"], targets, indices)
        return {"loss_mask": focal / norms["num_boxes"], "loss_dice": dice / norms["num_boxes"]}

    def mask_query_selection(self, targets: Sequence[Mapping]):
        """A `mask_queries` callable for the model's forward: the queries the matcher assigns to targets.

        The mask losses read only those masks, so computing the others is wasted work; at least
        one query is always selected, so the mask head takes part in every step (DDP needs that).
        """

        @torch.no_grad()
        def select(outputs: Mapping) -> Tensor:
            logits = outputs["pred_logits"]
            indices = self.matcher({"pred_logits": logits, "pred_boxes": outputs["pred_boxes"]}, targets)
            selected = torch.zeros(logits.shape[:2], dtype=torch.bool, device=logits.device)
            selected[matched_pairs([(rows.to(logits.device), cols) for rows, cols in indices])] = True
            selected[0, 0] |= not selected.any()  # at least one
            return selected

        return select

    # -- the whole loss ----------------------------------------------------------------
    def normalisers(self, outputs: Mapping, targets: Sequence[Mapping]) -> dict:
        """Global (all-worker) normalisers of the box and class losses."""
        logits = outputs["pred_logits"]
        batch, queries = logits.shape[:2]
        counts = [len(t["labels"]) for t in targets]
        matched = sum(min(queries, n) for n in counts)
        ce_weight = matched + self.eos_coef * (batch * queries - matched)
        local = torch.tensor([float(sum(counts)), float(ce_weight)], device=logits.device)
        num_boxes, ce_weight = all_reduce_mean(local).tolist()
        return {"num_boxes": max(num_boxes, 1.0), "ce_weight": max(ce_weight, 1e-6)}

    def check_targets(self, outputs: Mapping, targets: Sequence[Mapping]) -> None:
        if len(targets) != outputs["pred_logits"].shape[0]:
            raise ValueError(f"{len(targets)} targets for a batch of {outputs['pred_logits'].shape[0]} images")
        labels = torch.cat([t["labels"].reshape(-1) for t in targets] + [torch.zeros(0, dtype=torch.int64)])
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if len(bad):
            raise RaydetrError(f"a target has label {int(bad[0])}: labels must be in [0, num_classes={self.num_classes}) "
                             "(num_classes is the largest category id + 1)")

    def forward(self, outputs: Mapping, targets: Sequence[Mapping]) -> dict[str, Tensor]:
        """Unweighted loss terms for `outputs` of the model and per-image `targets`
        ("labels" [N] int64, "boxes" [N,4] normalised cxcywh)."""
        self.check_targets(outputs, targets)
        norms = self.normalisers(outputs, targets)
        last = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        losses = self.set_losses(last, targets, norms, self.matcher(last, targets), last=True)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            terms = self.set_losses(aux, targets, norms, self.matcher(aux, targets), last=False)
            losses.update({f"{k}_{i}": v for k, v in terms.items()})
        for extra in self.extra_losses:
            losses.update(extra(outputs, targets, norms, self))
        return losses

    def set_losses(self, outputs: Mapping, targets: Sequence[Mapping], norms: dict, indices: MatchIndices,
                   last: bool) -> dict[str, Tensor]:
        """The terms of one decoder layer, as the official code computes them: every layer logs its
        cardinality_error; only the last its class_error and the mask losses (too costly per layer)."""
        losses = self.loss_labels(outputs, targets, indices, norms, log=last)
        losses.update(self.loss_boxes(outputs, targets, indices, norms))
        losses.update(self.loss_cardinality(outputs, targets, indices, norms))
        if last and self.computes_masks:
            losses.update(self.loss_masks(outputs, targets, indices, norms))
        return losses

    def total(self, losses: Mapping[str, Tensor]) -> Tensor:
        """The training objective: the weighted sum of the loss terms that have a weight."""
        return sum(losses[k] * w for k, w in self.weight_dict.items() if k in losses)


class DenseHeadLoss(nn.Module):
    """The dense encoder head's `_enc` terms, one-to-many: each target repeated `matches` times, so the
    matcher gives it its `matches` best cells; with `mask_assignment` and targets with masks, also the
    other cells inside each target's mask (`detr.mask_assignment`)."""

    def __init__(self, matches: int, mask_assignment: bool = False) -> None:
        super().__init__()
        self.matches, self.mask_assignment = matches, mask_assignment

    def forward(self, outputs: Mapping, targets: Sequence[Mapping], norms: dict,
                criterion: SetCriterion) -> dict[str, Tensor]:
        enc, k = outputs["enc_outputs"], self.matches
        dense = {"pred_logits": enc["pred_logits"], "pred_boxes": enc["pred_boxes"]}
        scaled = {**norms, "num_boxes": norms["num_boxes"] * k}
        repeated = [{"labels": t["labels"].repeat(k), "boxes": t["boxes"].repeat(k, 1)} for t in targets]
        indices, weights = criterion.matcher(dense, repeated), None
        if self.mask_assignment and targets and all("masks" in t for t in targets):
            indices, weights = mask_assignment(indices, targets, enc["grid"], enc["stride"], k)
            repeated = targets
        losses = criterion.loss_labels(dense, repeated, indices, scaled, log=False, weights=weights)
        losses.update(criterion.loss_boxes(dense, repeated, indices, scaled, weights=weights))
        return {f"{name}_enc": value for name, value in losses.items()}


class SemanticLoss(nn.Module):
    """`loss_semantic`: every encoder cell classified as the segment under it (`detr.semantic_cells`)."""

    def forward(self, outputs: Mapping, targets: Sequence[Mapping], norms: dict,
                criterion: SetCriterion) -> dict[str, Tensor]:
        return {"loss_semantic": semantic_cell_loss(outputs["semantic_outputs"], targets)}
