"""The two ways the criterion classifies, chosen when it is built: the paper's softmax cross-entropy with a
down-weighted no-object class, or (`DETRConfig.focal`) the sigmoid focal loss over the real classes."""
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

    def loss(self, logits: Tensor, target_classes: Tensor, cell_weights: Tensor | None, norms: dict) -> Tensor:
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

    def loss(self, logits: Tensor, target_classes: Tensor, cell_weights: Tensor | None, norms: dict) -> Tensor:
        one_hot = F.one_hot(target_classes, self.num_classes + 1)[..., :-1].float()
        focal = sigmoid_focal_loss(logits[..., :-1].float(), one_hot, self.alpha, self.gamma,
                                   reduction="sum" if cell_weights is None else "none")
        return (focal if cell_weights is None else (focal * cell_weights[..., None]).sum()) / norms["num_boxes"]

    def real_class_logits(self, logits: Tensor) -> Tensor:
        return logits[..., :-1]

    def predicted_objects(self, logits: Tensor) -> Tensor:
        return (logits[..., :-1].max(-1).values > 0).sum(1).float()  # some p(class) > 0.5
