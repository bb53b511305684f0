"""What a detector looked at: its detections with the attention behind them, at the image's own pixels.

The paper's Fig. 6 (the last decoder layer's attention of each detected object: it attends to the object's
extremities) and Fig. 3 (the last encoder layer's self-attention at a few points: it already separates
instances). `explain_image` runs one image through a Detector's PyTorch model inside a
`detr.attention.AttentionRecorder` and maps each feature cell back onto the pixels it covers (cell (r, c)
covers the resized input's pixels [r*stride, (r+1)*stride)); `pipelines.inference.explain_drawing` draws it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import box_convert

from detr import detector_of, pad_images
from detr.attention import AttentionMaps, AttentionRecorder
from detr.errors import RaydetrError
from detr.postprocess import class_probabilities, scored_by_sigmoid


@dataclass
class Explanation:
    """One image's detections, each with its decoder attention, and the encoder's attention at points."""

    image: np.ndarray  # HWC uint8 RGB, as given
    boxes: np.ndarray  # [K, 4] xyxy in the image's pixels, best score first
    scores: np.ndarray  # [K]
    labels: np.ndarray  # [K] category ids
    queries: np.ndarray  # [K] the query (slot) that made each detection
    decoder_maps: np.ndarray  # [K, H, W] each detection's attention over the image, scaled to a maximum of 1
    points: list[tuple[float, float]]  # (x, y) in the image's pixels
    encoder_maps: np.ndarray  # [P, H, W] the self-attention of the cell under each point, maximum 1
    feature_size: tuple[int, int]  # (h, w) cells of the feature map the transformer attended over


def check_points(points: Sequence[tuple[float, float]], height: int, width: int, name: str = "the image") -> None:
    """One line for a point outside the image (x in [0, width), y in [0, height))."""
    outside = [f"{x:g},{y:g}" for x, y in points if not (0 <= x < width and 0 <= y < height)]
    if outside:
        raise RaydetrError(f"{name} is {width}x{height} (width x height): point {', '.join(outside)} lies outside it")


def _to_image(cells: torch.Tensor, stride: int, resized: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """[N, h, w] cell values -> [N, H, W] over the original image (each cell over the pixels it covers)."""
    h, w = cells.shape[-2:]
    pixels = F.interpolate(cells[:, None], size=(h * stride, w * stride), mode="nearest")[:, 0]
    pixels = pixels[:, :resized[0], :resized[1]]
    pixels = F.interpolate(pixels[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    peak = pixels.flatten(1).amax(1).clamp_min(1e-12)
    return (pixels / peak[:, None, None]).numpy()


def _kept_queries(outputs: dict, sigmoid: bool, score_threshold: float, top_k: int | None) -> tuple:
    """(queries, scores, labels) of the queries whose best class scores above the threshold, best first."""
    probabilities = class_probabilities(outputs, sigmoid)[0].float()
    scores, labels = probabilities.max(-1)
    keep = (scores > score_threshold).nonzero().flatten()
    keep = keep[scores[keep].argsort(descending=True, stable=True)][:top_k]
    return keep, scores[keep], labels[keep]


@torch.inference_mode()
def explain_image(detector, image: np.ndarray, points: Sequence[tuple[float, float]] | None = None,
                  score_threshold: float | None = None, top_k: int | None = 10) -> Explanation:
    """The detections of `image` (HWC uint8 RGB) above `score_threshold` (default: the detector's), at most
    `top_k`, with their decoder attention, and the encoder's self-attention at `points` (x, y in the image's
    pixels; none given: each detection's centre)."""
    if detector.model is None or detector.runtime != "torch":
        raise RaydetrError("explaining needs the PyTorch model (a checkpoint or registry model), not an export")
    height, width = image.shape[:2]
    if points:
        check_points(points, height, width)
    resized = detector.preprocessing.resize(image)
    batch, mask = pad_images([detector.preprocessing.normalize(resized)])
    with AttentionRecorder(detector.model) as recorder:
        outputs = detector.forward(batch, mask)
    maps: AttentionMaps = recorder.maps()
    threshold = detector.score_threshold if score_threshold is None else score_threshold
    # labels: the classifier's indices, which are the category ids
    queries, scores, labels = _kept_queries(outputs, scored_by_sigmoid(detector.config), threshold or 0.0, top_k)
    boxes = box_convert(outputs["pred_boxes"][0, queries].float(), "cxcywh", "xyxy")
    boxes = boxes * torch.tensor([width, height, width, height], dtype=boxes.dtype)
    if not points:
        points = [(float((b[0] + b[2]) / 2), float((b[1] + b[3]) / 2)) for b in boxes.tolist()]
        points = [(min(max(x, 0.0), width - 1.0), min(max(y, 0.0), height - 1.0)) for x, y in points]
    stride = detector_of(detector.model).backbone.stride
    size_r = tuple(int(v) for v in resized.shape[-2:])
    cells = [(min(int(y * size_r[0] / height) // stride, maps.feature_size[0] - 1),
              min(int(x * size_r[1] / width) // stride, maps.feature_size[1] - 1)) for x, y in points]
    h, w = maps.feature_size
    decoder = maps.decoder[0, queries].reshape(-1, h, w)
    encoder = torch.stack([maps.encoder_map(0, cell) for cell in cells]) if cells else torch.zeros(0, h, w)
    return Explanation(image, boxes.numpy(), scores.numpy(), labels.numpy(),
                       queries.numpy(), _to_image(decoder, stride, size_r, (height, width)), list(points),
                       _to_image(encoder, stride, size_r, (height, width)), maps.feature_size)


__all__ = ["Explanation", "check_points", "explain_image"]
