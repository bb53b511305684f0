"""The same samples as a plain `torch.utils.data.Dataset`, without Ray.

For single-process tools and for the benchmark's baseline (a DataLoader with
the same transforms and worker count as the Ray pipeline). Rejected records
yield None and are skipped by `collate_skipping_rejected`.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.utils.data

from detr.errors import RaydetrError
from pipelines.sources import Source, iter_records
from pipelines.training.collate import collate_samples
from pipelines.training.samples import make_sample
from pipelines.training.transforms import TransformsConfig, build_transform
from pipelines.validation.decode import DecodeLimits


class DetectionTorchDataset(torch.utils.data.Dataset):
    """Random access over a source's records (planned sources: COCO, YOLO, VOC, folders)."""

    def __init__(self, source: Source, *, train: bool, transforms: TransformsConfig = TransformsConfig(),
                 seed: int | None = 0, epoch: int = 0, limits: DecodeLimits = DecodeLimits()):
        if any(u.kind != "records" for u in source.units):
            raise RaydetrError(f"{source.path}: a {source.kind} source streams; use the Ray pipeline instead")
        self.records = list(iter_records(source))
        self.known = source.category_ids
        self.transform = build_transform(transforms, train)
        self.seed, self.epoch, self.limits = seed, epoch, limits
        self.with_masks = source.is_panoptic or None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        sample, _, _ = make_sample(self.records[index], self.transform, seed=self.seed, epoch=self.epoch,
                                   known_categories=self.known, limits=self.limits, with_masks=self.with_masks)
        return sample


def collate_skipping_rejected(samples: list[dict[str, Any] | None]):
    return collate_samples([s for s in samples if s is not None])


def endless_batches(dataset: DetectionTorchDataset, batch_size: int, seed: int = 0,
                    workers: int = 0) -> Iterator[Any]:
    """Shuffled training batches without end (single-process training loops, benchmarks); each
    pass sets the dataset's epoch, so it draws new augmentations, reproducibly for `seed`."""
    generator = torch.Generator().manual_seed(seed)
    epoch = 0
    while True:
        dataset.epoch = epoch
        yield from torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator,
                                               collate_fn=collate_skipping_rejected, num_workers=workers,
                                               drop_last=True)
        epoch += 1
