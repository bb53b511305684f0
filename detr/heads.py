"""The small prediction heads the model's parts share: an MLP, and the initialisations the parts choose."""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

FOCAL_PRIOR = 0.01
"""Initial class probability of a focal-loss class head."""


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


def start_at_focal_prior(classifier: nn.Linear) -> None:
    """Every class starts at p = 0.01, as with any sigmoid focal loss: otherwise the many background
    queries or cells dominate the first steps (RetinaNet, Deformable DETR)."""
    nn.init.constant_(classifier.bias, -math.log((1 - FOCAL_PRIOR) / FOCAL_PRIOR))


def start_at_reference(box_head: MLP) -> None:
    """A box head that predicts offsets from reference boxes starts at the references themselves."""
    nn.init.zeros_(box_head.layers[-1].weight)
    nn.init.zeros_(box_head.layers[-1].bias)
