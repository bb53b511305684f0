"""The set-prediction loss: Hungarian matching, then per-pair class and box losses.

Loss names are the official implementation's, so users recognise them:
`loss_ce` (weighted cross-entropy, the no-object class down-weighted by
`eos_coef`; with `focal_loss`, the sigmoid focal loss over the real classes,
normalised by the number of boxes as in Deformable DETR), `loss_bbox` (L1 on normalised cxcywh boxes), `loss_giou`
(1 - generalised IoU), and the logged-only `class_error` and `cardinality_error`;
with auxiliary losses, every decoder layer but the last adds the same terms with
the suffix `_0`, `_1`, ...; the dense encoder head adds `_enc` terms (one-to-many).

Normalisation is global across distributed workers: box losses are divided by
the number of target boxes averaged over workers (as in the official code), and
the cross-entropy by the sum of class weights averaged over workers (the official
code uses each worker's own sum, which differs when workers see different numbers
of objects). With DDP averaging gradients, N workers with 1/N of the batch each
then compute exactly the loss and gradients of one worker with the whole batch.
In a single process both are identical to the official definitions.

With masks (`DETRConfig.masks`), the final decoder layer's matched masks add
`loss_mask` (sigmoid focal loss, mean over pixels) and `loss_dice`, each summed
over matched pairs and divided by the same box normaliser (the official code
computes no auxiliary mask losses either). Targets then carry "masks" [N, h, w]
at the image's own (processed) size. The official code upsamples the padded
`pred_masks` to the batch's padded target size and counts padded pixels as
background; a padding-invariant model instead scores each image's own pixels
(`detr.segmentation.masks_to_image`), so its loss does not depend on the batch.
With `semantic_loss_coef`, `loss_semantic` classifies every encoder cell as the
segment under it (`detr.semantic_cells`).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou_loss, sigmoid_focal_loss

from .config import DETRConfig
from .distributed import all_reduce_mean
from .mask_assignment import mask_assignment
from .matcher import HungarianMatcher, MatchIndices
from .segmentation import dice_loss, mask_focal_loss, masks_to_image
from .semantic_cells import semantic_cell_loss

DEFAULT_LOSSES = ("labels", "boxes", "cardinality")
MASK_LOSSES = ("masks",)


def loss_weights(config: DETRConfig) -> dict[str, float]:
    """Weight of each loss term in the total loss, including the auxiliary `_i` copies."""
    base = {"loss_ce": config.ce_loss_coef, "loss_bbox": config.bbox_loss_coef, "loss_giou": config.giou_loss_coef}
    weights = dict(base)
    if config.aux_loss:
        for i in range(config.dec_layers - 1):
            weights.update({f"{k}_{i}": v for k, v in base.items()})
    if config.encoder_aux_matches:
        weights.update({f"{k}_enc": v for k, v in base.items()})
    if config.masks:
        weights.update({"loss_mask": config.mask_loss_coef, "loss_dice": config.dice_loss_coef})
    if config.semantic_loss_coef:
        weights["loss_semantic"] = config.semantic_loss_coef
    return weights


def _src_permutation(indices: MatchIndices) -> tuple[Tensor, Tensor]:
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    src_idx = torch.cat([src for src, _ in indices])
    return batch_idx, src_idx


class SetCriterion(nn.Module):
    """Computes DETR's losses for a batch; `total` combines them with `weight_dict`."""

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: Mapping[str, float],
        eos_coef: float = 0.1,
        losses: Sequence[str] = DEFAULT_LOSSES,
        padding_invariant: bool = True,
        focal: tuple[float, float] | None = None,
        encoder_mask_assignment: bool = False,
    ) -> None:
        """`focal=(alpha, gamma)` replaces the cross-entropy by the sigmoid focal loss;
        `encoder_mask_assignment` see `DETRConfig` (and `detr.mask_assignment`)."""
        super().__init__()
        unknown = set(losses) - set(DEFAULT_LOSSES) - set(MASK_LOSSES)
        if unknown:
            raise ValueError(f"unknown loss(es) {sorted(unknown)}; available: {DEFAULT_LOSSES + MASK_LOSSES}")
        self.padding_invariant = padding_invariant
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.eos_coef = eos_coef
        self.losses = tuple(losses)
        self.focal = focal
        self.encoder_mask_assignment = encoder_mask_assignment
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    @classmethod
    def from_config(cls, config: DETRConfig) -> "SetCriterion":
        focal = (config.focal_alpha, config.focal_gamma) if config.focal_loss else None
        matcher = HungarianMatcher(config.set_cost_class, config.set_cost_bbox, config.set_cost_giou, focal)
        losses = DEFAULT_LOSSES + (MASK_LOSSES if config.masks else ())
        return cls(config.num_classes, matcher, loss_weights(config), config.eos_coef, losses,
                   padding_invariant=config.padding_invariant, focal=focal,
                   encoder_mask_assignment=config.encoder_mask_assignment)

    # -- individual losses -------------------------------------------------------------
    def loss_labels(
        self, outputs: Mapping, targets: Sequence[Mapping], indices: MatchIndices, norms: dict, log: bool = True,
        weights: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """`weights`: one per matched prediction (in `indices` order) scaling its term; unmatched ones weigh 1."""
        logits = outputs["pred_logits"]
        idx = _src_permutation(indices)
        matched_classes = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).long()
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[idx] = matched_classes
        cell_weights = None
        if weights is not None:
            cell_weights = torch.ones(logits.shape[:2], device=logits.device)
            cell_weights[idx] = weights.to(cell_weights)
        if self.focal is None:
            ce = F.cross_entropy(logits.transpose(1, 2).float(), target_classes, self.empty_weight,
                                 reduction="sum" if cell_weights is None else "none")
            ce_sum = ce if cell_weights is None else (ce * cell_weights).sum()
            losses = {"loss_ce": ce_sum / norms["ce_weight"]}
        else:
            # One-hot over num_classes + 1 columns, then the no-object column is dropped: background is all-zero.
            one_hot = F.one_hot(target_classes, self.num_classes + 1)[..., :-1].float()
            alpha, gamma = self.focal
            focal = sigmoid_focal_loss(logits[..., :-1].float(), one_hot, alpha, gamma,
                                       reduction="sum" if cell_weights is None else "none")
            focal_sum = focal if cell_weights is None else (focal * cell_weights[..., None]).sum()
            losses = {"loss_ce": focal_sum / norms["num_boxes"]}
        if log:
            if matched_classes.numel() == 0:
                losses["class_error"] = torch.zeros((), device=logits.device)
            else:
                scored = logits[idx] if self.focal is None else logits[idx][..., :-1]
                correct = (scored.argmax(-1) == matched_classes).float().mean()
                losses["class_error"] = 100.0 - 100.0 * correct
        return losses

    @torch.no_grad()
    def loss_cardinality(
        self, outputs: Mapping, targets: Sequence[Mapping], indices: MatchIndices, norms: dict
    ) -> dict[str, Tensor]:
        """Mean absolute error of the number of non-"no object" predictions (logged, not trained)."""
        logits = outputs["pred_logits"]
        target_counts = torch.as_tensor([len(t["labels"]) for t in targets], device=logits.device, dtype=torch.float)
        if self.focal is None:
            predicted_counts = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1).float()
        else:
            predicted_counts = (logits[..., :-1].max(-1).values > 0).sum(1).float()  # some p(class) > 0.5
        return {"cardinality_error": F.l1_loss(predicted_counts, target_counts)}

    def loss_boxes(
        self, outputs: Mapping, targets: Sequence[Mapping], indices: MatchIndices, norms: dict,
        weights: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """`weights`: one per matched prediction (in `indices` order) scaling its terms."""
        idx = _src_permutation(indices)
        src_boxes = outputs["pred_boxes"][idx].float()
        target_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)], dim=0).to(src_boxes)
        scale = torch.ones(len(src_boxes), device=src_boxes.device) if weights is None else weights.to(src_boxes)
        loss_bbox = (F.l1_loss(src_boxes, target_boxes, reduction="none").sum(1) * scale).sum()
        loss_giou = (generalized_box_iou_loss(
            box_convert(src_boxes, "cxcywh", "xyxy"), box_convert(target_boxes, "cxcywh", "xyxy"), reduction="none"
        ) * scale).sum()
        return {"loss_bbox": loss_bbox / norms["num_boxes"], "loss_giou": loss_giou / norms["num_boxes"]}

    def loss_masks(
        self, outputs: Mapping, targets: Sequence[Mapping], indices: MatchIndices, norms: dict
    ) -> dict[str, Tensor]:
        """Focal and dice losses of the matched masks against the targets' "masks" [N, h, w]."""
        if "pred_masks" not in outputs:
            raise ValueError("the mask losses need outputs with 'pred_masks' (a model built with masks=True)")
        if any("masks" not in t for t in targets):
            raise ValueError("the mask losses need targets with 'masks' [N, h, w] (binary, at the image's size)")
        pred = outputs["pred_masks"]
        if self.padding_invariant:
            src, tgt = [], []
            for i, (t, (rows, cols)) in enumerate(zip(targets, indices)):
                if len(rows) == 0:
                    continue
                target_masks = t["masks"][cols]
                src.append(masks_to_image(pred[i, rows], target_masks.shape[-2:]).flatten(1))
                tgt.append(target_masks.flatten(1).to(src[-1].dtype))
            focal = sum((mask_focal_loss(s, g).sum() for s, g in zip(src, tgt)), pred.sum() * 0.0)
            dice = sum((dice_loss(s, g).sum() for s, g in zip(src, tgt)), pred.sum() * 0.0)
        else:
            # The official computation: the padded target masks of the batch, the padded logits
            # upsampled to their size, padding counted as background.
            batch_idx, src_idx = _src_permutation(indices)
            src_masks = pred[batch_idx, src_idx]
            max_h = max(int(t["masks"].shape[-2]) for t in targets)
            max_w = max(int(t["masks"].shape[-1]) for t in targets)
            target_masks = pred.new_zeros((len(src_idx), max_h, max_w), dtype=torch.float32)
            k = 0
            for t, (_, cols) in zip(targets, indices):
                m = t["masks"][cols]
                target_masks[k:k + len(cols), : m.shape[-2], : m.shape[-1]] = m.float()
                k += len(cols)
            if len(src_idx) == 0:
                zero = pred.sum() * 0.0
                return {"loss_mask": zero, "loss_dice": zero}
            src_masks = F.interpolate(src_masks[:, None].float(), size=(max_h, max_w), mode="bilinear",
                                      align_corners=False)[:, 0].flatten(1)
            target_masks = target_masks.flatten(1)
            focal = mask_focal_loss(src_masks, target_masks).sum()
            dice = dice_loss(src_masks, target_masks).sum()
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
            for i, (rows, _) in enumerate(indices):
                selected[i, rows.to(logits.device)] = True
            if not selected.any():
                selected[0, 0] = True
            return selected

        return select

    # -- the whole loss ----------------------------------------------------------------
    def _normalisers(self, outputs: Mapping, targets: Sequence[Mapping]) -> dict:
        """Global (all-worker) normalisers of the box and class losses."""
        logits = outputs["pred_logits"]
        batch, queries = logits.shape[:2]
        counts = [len(t["labels"]) for t in targets]
        matched = sum(min(queries, n) for n in counts)
        ce_weight = matched + self.eos_coef * (batch * queries - matched)
        local = torch.tensor([float(sum(counts)), float(ce_weight)], device=logits.device)
        num_boxes, ce_weight = all_reduce_mean(local).tolist()
        return {"num_boxes": max(num_boxes, 1.0), "ce_weight": max(ce_weight, 1e-6)}

    def _check_targets(self, outputs: Mapping, targets: Sequence[Mapping]) -> None:
        if len(targets) != outputs["pred_logits"].shape[0]:
            raise ValueError(f"{len(targets)} targets for a batch of {outputs['pred_logits'].shape[0]} images")
        for i, t in enumerate(targets):
            labels = t["labels"]
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(
                    f"target {i} has label {int(labels.max())}: labels must be in [0, num_classes={self.num_classes}) "
                    "(num_classes is the largest category id + 1)"
                )

    def get_loss(self, name: str, outputs: Mapping, targets: Sequence[Mapping], indices: MatchIndices,
                 norms: dict, **kwargs) -> dict[str, Tensor]:
        return getattr(self, f"loss_{name}")(outputs, targets, indices, norms, **kwargs)

    def forward(self, outputs: Mapping, targets: Sequence[Mapping]) -> dict[str, Tensor]:
        """Unweighted loss terms for `outputs` of the model and per-image `targets`
        ("labels" [N] int64, "boxes" [N,4] normalised cxcywh)."""
        self._check_targets(outputs, targets)
        norms = self._normalisers(outputs, targets)
        losses = self._set_losses(outputs, targets, norms, log=True)
        if "enc_outputs" in outputs:
            losses.update(self._encoder_losses(outputs["enc_outputs"], targets, norms))
        if "semantic_outputs" in outputs:
            losses["loss_semantic"] = semantic_cell_loss(outputs["semantic_outputs"], targets)
        return losses

    def _encoder_losses(self, enc: Mapping, targets: Sequence[Mapping], norms: dict) -> dict[str, Tensor]:
        """One-to-many: each target repeated k times, so the matcher gives it its k best cells; with
        `encoder_mask_assignment` and masks, also the other cells inside each target's mask (`detr.mask_assignment`)."""
        k = int(enc["matches_per_target"])
        dense = {"pred_logits": enc["pred_logits"], "pred_boxes": enc["pred_boxes"]}
        scaled = {**norms, "num_boxes": norms["num_boxes"] * k}
        repeated = [{"labels": t["labels"].repeat(k), "boxes": t["boxes"].repeat(k, 1)} for t in targets]
        indices, weights = self.matcher(dense, repeated), None
        if self.encoder_mask_assignment and targets and all("masks" in t for t in targets):
            indices, weights = mask_assignment(indices, targets, enc["grid"], enc["stride"], k)
            repeated = targets
        losses = self.get_loss("labels", dense, repeated, indices, scaled, log=False, weights=weights)
        losses.update(self.get_loss("boxes", dense, repeated, indices, scaled, weights=weights))
        return {f"{name}_enc": value for name, value in losses.items()}

    def _set_losses(self, outputs: Mapping, targets: Sequence[Mapping], norms: dict, log: bool) -> dict[str, Tensor]:
        """The terms of one query set: its last layer, then each auxiliary layer (suffix `_i`), each matched
        on its own. Without `log`, only the trained terms (no class_error, no cardinality_error)."""
        losses: dict[str, Tensor] = {}
        names = self.losses if log else [n for n in self.losses if n != "cardinality"]
        last = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        indices = self.matcher(last, targets)
        for name in names:
            kwargs = {} if log or name != "labels" else {"log": False}
            losses.update(self.get_loss(name, last, targets, indices, norms, **kwargs))
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            aux_indices = self.matcher(aux, targets)
            for name in names:
                if name == "masks":
                    continue  # too costly per layer; the official code skips them too
                kwargs = {"log": False} if name == "labels" else {}
                terms = self.get_loss(name, aux, targets, aux_indices, norms, **kwargs)
                losses.update({f"{k}_{i}": v for k, v in terms.items()})
        return losses

    def total(self, losses: Mapping[str, Tensor]) -> Tensor:
        """The training objective: the weighted sum of the loss terms that have a weight."""
        return sum(losses[k] * w for k, w in self.weight_dict.items() if k in losses)
