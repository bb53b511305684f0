"""Pictures of an `Explanation`: the decoder's attention of each detection (Fig. 6) and the encoder's
self-attention at points (Fig. 3), as PNGs.

Each detection has one colour (PALETTE, in the order of its score) for its box and its attention, so the
picture says which attention made which box; the encoder's panels are matplotlib figures, one per point.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageColor
from torchvision.utils import draw_bounding_boxes

from pipelines.inference.drawing import PALETTE
from pipelines.inference.explain import Explanation

DIM = 0.45
"""How much of the photo shows under the attention (the rest is darkened, so the attention stands out)."""


def detection_colour(index: int) -> tuple[int, int, int]:
    return ImageColor.getrgb(PALETTE[index % len(PALETTE)])


def draw_decoder_attention(explanation: Explanation, label_name: Callable[[int], str] = str,
                           min_side: int = 384) -> Image.Image:
    """The image, dimmed, with each detection's attention laid over it in the detection's colour (strongest
    where the map is 1), and the boxes drawn in the same colours; a small image is enlarged (by a whole
    factor) until its shorter side is at least `min_side` pixels, so the labels can be read."""
    canvas = explanation.image.astype(np.float32) * DIM
    for index, attention in enumerate(explanation.decoder_maps):
        alpha = 0.85 * attention[..., None]
        canvas = canvas * (1 - alpha) + np.asarray(detection_colour(index), np.float32) * alpha
    h, w = explanation.image.shape[:2]
    factor = max(1, -(-min_side // min(h, w)))
    picture = Image.fromarray(canvas.clip(0, 255).astype(np.uint8)).resize((w * factor, h * factor),
                                                                           Image.Resampling.NEAREST)
    pixels = torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1)
    if len(explanation.boxes):
        boxes = torch.as_tensor(explanation.boxes, dtype=torch.float32).clone()
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w - 1)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h - 1)
        pixels = draw_bounding_boxes(
            pixels, boxes * factor, labels=[f"{label_name(int(label))} {score:.2f}"
                                            for label, score in zip(explanation.labels, explanation.scores)],
            colors=[detection_colour(i) for i in range(len(boxes))], width=max(2, min(h, w) * factor // 150))
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())


def plot_encoder_attention(explanation: Explanation, path: str, columns: int = 4) -> str:
    """The image with the points marked, then the encoder's self-attention at each point over the image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 1 + len(explanation.points)
    columns = min(columns, panels)
    rows = (panels + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(explanation.image)
    axes.flat[0].set_title("points", fontsize=9)
    for index, ((x, y), attention) in enumerate(zip(explanation.points, explanation.encoder_maps)):
        colour = np.asarray(detection_colour(index)) / 255
        axes.flat[0].plot([x], [y], "o", color=colour, markersize=7, markeredgecolor="white")
        ax = axes.flat[index + 1]
        ax.imshow(explanation.image, alpha=0.5)
        ax.imshow(attention, cmap="viridis", alpha=0.6)
        ax.plot([x], [y], "o", color=colour, markersize=6, markeredgecolor="white")
        ax.set_title(f"self-attention at ({x:.0f}, {y:.0f})", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


__all__ = ["detection_colour", "draw_decoder_attention", "plot_encoder_attention"]
