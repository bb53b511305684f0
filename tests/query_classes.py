"""Give a random DETR's queries distinct classes, so class filters and panoptic merges have work to do."""
from __future__ import annotations

import numpy as np
import torch

from pipelines.inference.detector import Detector
from pipelines.training.transforms import TransformsConfig


def fit_query_classes(model: torch.nn.Module, transforms: TransformsConfig, image_size: tuple[int, int],
                      images: list[np.ndarray] | None = None) -> None:
    """Fit the class head (on the decoder outputs for `images`, default 8 random images of `image_size`) to
    give query q the class q % 4 + 1. An untouched random model calls every query the same class. Fit on
    images like those the test labels: a head fitted on noise need not tell queries apart on drawings."""
    from detr import detector_of

    head = detector_of(model).class_embed
    decoded = []
    hook = head.register_forward_hook(lambda module, inputs, output: decoded.append(inputs[0][-1]))
    rng = np.random.default_rng(0)
    images = images or [rng.integers(0, 255, (*image_size, 3), dtype=np.uint8) for _ in range(8)]
    Detector(model, transforms).detect(images)
    hook.remove()
    features = decoded[0].reshape(-1, model.config.hidden_dim).clone()
    target = torch.arange(model.config.num_queries).repeat(len(images)) % 4 + 1
    optimizer = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(200):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(head(features), target).backward()
        optimizer.step()
