"""The ways the criterion classifies, chosen when it is built: the paper's softmax cross-entropy with a
down-weighted no-object class, (`DETRConfig.focal`) the sigmoid focal loss over the real classes, or (`focal:
{iou_aware: true}`) the varifocal loss, whose matched targets are their boxes' IoUs.

Every `loss` takes `quality` [B, Q]: each matched prediction's box IoU with its target (0 elsewhere), which
only the varifocal loss reads (`iou_aware` tells the criterion to compute it)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss


class CrossEntropyClasses(nn.Module):
    """Weighted cross-entropy over num_classes + 1 classes, the last ("no object") weighted `eos_coef`,
    normalised by the sum of class weights (`norms["ce_weight"]`)."""

    def __init__(self, num_classes: int, eos_coef: float) -> None:
        super().__init__()
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    iou_aware = False

    def loss(self, logits: Tensor, target_classes: Tensor, cell_weights: Tensor | None, norms: dict,
             quality: Tensor | None = None) -> Tensor:
        """`cell_weights` [B, Q] scale each prediction's term (None: all 1)."""
        ce = F.cross_entropy(logits.transpose(1, 2).float(), target_classes, self.empty_weight,
                             reduction="sum" if cell_weights is None else "none")
        return (ce if cell_weights is None else (ce * cell_weights).sum()) / norms["ce_weight"]

    def real_class_logits(self, logits: Tensor) -> Tensor:
        """The logits a prediction's class is read from (for `class_error`)."""
        return logits

    def predicted_objects(self, logits: Tensor) -> Tensor:
        """[B] how many queries predict an object (for `cardinality_error`)."""
        return (logits.argmax(-1) != logits.shape[-1] - 1).sum(1).float()


class FocalClasses(nn.Module):
    """Sigmoid focal loss over the real classes (the last logit goes unused; background is all-zero),
    normalised by the number of target boxes, as in Deformable DETR."""

    def __init__(self, num_classes: int, alpha: float, gamma: float) -> None:
        super().__init__()
        self.num_classes, self.alpha, self.gamma = num_classes, alpha, gamma

    iou_aware = False

    def loss(self, logits: Tensor, target_classes: Tensor, cell_weights: Tensor | None, norms: dict,
             quality: Tensor | None = None) -> Tensor:
        one_hot = F.one_hot(target_classes, self.num_classes + 1)[..., :-1].float()
        focal = sigmoid_focal_loss(logits[..., :-1].float(), one_hot, self.alpha, self.gamma,
                                   reduction="sum" if cell_weights is None else "none")
        return (focal if cell_weights is None else (focal * cell_weights[..., None]).sum()) / norms["num_boxes"]

    def real_class_logits(self, logits: Tensor) -> Tensor:
        return logits[..., :-1]

    def predicted_objects(self, logits: Tensor) -> Tensor:
        return (logits[..., :-1].max(-1).values > 0).sum(1).float()  # some p(class) > 0.5


class VarifocalClasses(FocalClasses):
    """The varifocal loss (VarifocalNet; RT-DETR's IoU-aware classification): a matched prediction's target
    for its class is its box's IoU with the target box rather than 1, weighted by that IoU; every other
    (prediction, class) pair is a negative weighted `(1 - alpha) * p ** gamma`, as in the focal loss. Scores
    then rank predictions by how well they box their object, which is what AP at strict IoUs and the
    two-stage query selection (the dense head's best cells) reward. Normalised by the number of target
    boxes."""

    iou_aware = True

    def loss(self, logits: Tensor, target_classes: Tensor, cell_weights: Tensor | None, norms: dict,
             quality: Tensor | None = None) -> Tensor:
        if quality is None:
            raise ValueError("the varifocal loss needs each matched prediction's box IoU (`quality`)")
        real = logits[..., :-1].float()
        one_hot = F.one_hot(target_classes, self.num_classes + 1)[..., :-1].float()
        target = one_hot * quality[..., None].to(real)
        weight = (1 - self.alpha) * real.sigmoid().detach().pow(self.gamma) * (1 - one_hot) + target
        if cell_weights is not None:
            weight = weight * cell_weights[..., None]
        return F.binary_cross_entropy_with_logits(real, target, weight=weight, reduction="sum") / norms["num_boxes"]
