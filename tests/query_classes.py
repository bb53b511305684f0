"""Fit a random DETR's heads in seconds: queries with distinct classes (so class filters and panoptic merges have
work to do), or heads that find each image's one object (a model clearly better than an untrained one)."""
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


def fit_heads_to_objects(model: torch.nn.Module, transforms: TransformsConfig, images: list[np.ndarray],
                         boxes: list[list[float]], classes: list[int]) -> None:
    """Fit the class and box heads (on the decoder outputs for `images`) so that query 0 finds each image's one
    object (`boxes`: normalised cx, cy, w, h) and the other queries say "no object": a model that is clearly
    better than an untrained one on these images, in seconds instead of a training run."""
    from detr import detector_of

    detector = detector_of(model)
    decoded = []
    hook = detector.class_embed.register_forward_hook(lambda module, inputs, output: decoded.append(inputs[0][-1]))
    run = Detector(model, transforms, optimize=False)
    for image in images:  # one at a time: each image's features as it is seen alone
        run.detect([image])
    hook.remove()
    features = torch.cat(decoded)  # [N, Q, D]
    no_object = model.config.num_classes
    target = torch.full(features.shape[:2], no_object)
    target[:, 0] = torch.as_tensor(classes)
    weight = torch.ones(no_object + 1)
    weight[no_object] = 0.1  # the paper's eos_coef
    heads = list(detector.class_embed.parameters()) + list(detector.bbox_embed.parameters())
    optimizer = torch.optim.Adam(heads, lr=0.01)
    wanted = torch.as_tensor(boxes, dtype=torch.float32)
    for _ in range(500):
        optimizer.zero_grad()
        logits = detector.class_embed(features).flatten(0, 1)
        loss = torch.nn.functional.cross_entropy(logits, target.flatten(), weight=weight) + 5 * \
            torch.nn.functional.l1_loss(detector.bbox_embed(features[:, 0]).sigmoid(), wanted)
        loss.backward()
        optimizer.step()
