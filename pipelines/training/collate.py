"""Batches for the model: `(images, mask, targets)`, padded with detr.batching.pad_images.

Images travel through the pipeline as uint8 (a quarter of float32's bytes) and
are normalised here, in the training process, just before padding. Works on a
Ray Data numpy batch (`iter_torch_batches(collate_fn=DetectionCollate(...))`)
and on a list of samples (a torch DataLoader's `collate_fn`).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from detr.batching import pad_images
from pipelines.training.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize_image

Batch = tuple[torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]]]


def _rows(batch: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    if isinstance(batch, Mapping):
        n = len(batch["image_id"])
        return [{k: batch[k][i] for k in batch} for i in range(n)]
    return list(batch)


def collate_samples(
    batch: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    size_divisibility: int = 1,
) -> Batch:
    """Samples (see pipelines.training.samples) -> images float32 [B,3,H,W] normalised and zero-padded
    bottom/right, mask bool [B,H,W] True on padding, and one target dict per image."""
    rows = _rows(batch)
    images = [normalize_image(torch.from_numpy(np.require(r["image"], requirements=["C", "W"])), tuple(mean), tuple(std))
              for r in rows]
    padded, mask = pad_images(images, size_divisibility=size_divisibility)
    targets = []
    for r in rows:
        targets.append(
            {
                "labels": torch.tensor(np.asarray(r["labels"], dtype=np.int64).reshape(-1)),
                "boxes": torch.tensor(np.asarray(r["boxes"], dtype=np.float32).reshape(-1, 4)),
                "image_id": torch.as_tensor(int(r["image_id"]), dtype=torch.int64),
                "orig_size": torch.tensor(np.asarray(r["orig_size"], dtype=np.int64).reshape(2)),
                "size": torch.tensor(np.asarray(r["size"], dtype=np.int64).reshape(2)),
                "area": torch.tensor(np.asarray(r["area"], dtype=np.float32).reshape(-1)),
                "iscrowd": torch.tensor(np.asarray(r["iscrowd"], dtype=np.int64).reshape(-1)),
            }
        )
        if "masks" in r:  # panoptic samples: bool [N, h, w] at the sample's (unpadded) size
            h, w = (int(v) for v in np.asarray(r["size"]).reshape(2))
            targets[-1]["masks"] = torch.from_numpy(np.asarray(r["masks"]).astype(bool).reshape(-1, h, w))
    return padded, mask, targets


class DetectionCollate(NumpyBatchCollateFn):
    """`collate_fn` for `iter_torch_batches`: a Ray Data numpy batch -> (images, mask, targets)."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 size_divisibility: int = 1):
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.size_divisibility = size_divisibility

    def __call__(self, batch: dict[str, np.ndarray]) -> Batch:
        return collate_samples(batch, self.mean, self.std, self.size_divisibility)
