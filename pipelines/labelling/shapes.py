"""Grouping images by size so that a padded batch is mostly image, not padding.

DETR pads every image of a batch to the batch's largest height and width. The
model is padding-invariant (detections do not depend on the batch), so grouping
changes only the work done: windows of images are ordered by their size at the
model's input, and an actor splits a batch where padding would waste more than
`max_waste` of the pixels it computes.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

DEFAULT_MAX_WASTE = 0.25


def shape_order(shapes: Sequence[Sequence[int]]) -> np.ndarray:
    """Indices that order (height, width) pairs by height, then width: equal shapes end up adjacent."""
    arr = np.asarray(shapes, dtype=np.int64).reshape(-1, 2)
    return np.lexsort((arr[:, 1], arr[:, 0]))


def padding_groups(shapes: Sequence[Sequence[int]], max_waste: float = DEFAULT_MAX_WASTE) -> list[list[int]]:
    """Split images, in `shape_order`, into runs whose padded area exceeds their own area by at most
    `max_waste` (a fraction). Returns lists of indices into `shapes`; every index appears once."""
    groups: list[list[int]] = []
    current: list[int] = []
    max_h = max_w = area = 0
    for i in shape_order(shapes).tolist():
        h, w = int(shapes[i][0]), int(shapes[i][1])
        grown_h, grown_w, grown_area = max(max_h, h), max(max_w, w), area + h * w
        if current and grown_h * grown_w * (len(current) + 1) > (1 + max_waste) * grown_area:
            groups.append(current)
            current, max_h, max_w, area = [], 0, 0, 0
            grown_h, grown_w, grown_area = h, w, h * w
        current.append(i)
        max_h, max_w, area = grown_h, grown_w, grown_area
    if current:
        groups.append(current)
    return groups


def padding_waste(shapes: Sequence[Sequence[int]]) -> float:
    """Fraction of a padded batch's pixels that are padding."""
    arr = np.asarray(shapes, dtype=np.int64).reshape(-1, 2)
    if len(arr) == 0:
        return 0.0
    padded = int(arr[:, 0].max()) * int(arr[:, 1].max()) * len(arr)
    return 1.0 - float((arr[:, 0] * arr[:, 1]).sum()) / padded if padded else 0.0
