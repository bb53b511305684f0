"""The epoch a training dataset is being read for, where its Ray Data tasks can see it.

Augmentation is seeded from (seed, epoch, image id) so that a run resumed at
epoch k draws exactly the augmentations it would have drawn. The tasks that
augment run in Ray Data's workers, which do not know the epoch; the training loop
does. So the loop sets the epoch on this clock (a tiny actor) before it reads the
epoch's batches (`DetectionDataset.set_epoch`, like torch's
`DistributedSampler.set_epoch`), and each task reads it once per batch.

Setting is safe across workers: they set the same epoch, every batch of epoch k
is consumed before any worker moves on (they stop in lock step), and Ray Data
starts reading epoch k + 1 only when a worker asks for it, after setting it.
"""
from __future__ import annotations

from typing import Any


class _Epoch:
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def set(self, epoch: int) -> None:
        self.epoch = epoch

    def get(self) -> int:
        return self.epoch


class EpochClock:
    """A handle to the clock's actor; picklable, so it travels into Ray Data tasks and training workers."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    @classmethod
    def create(cls, epoch: int = 0) -> "EpochClock":
        import ray

        return cls(ray.remote(num_cpus=0)(_Epoch).remote(int(epoch)))

    def set(self, epoch: int) -> None:
        import ray

        ray.get(self.actor.set.remote(int(epoch)))

    def get(self) -> int:
        import ray

        return int(ray.get(self.actor.get.remote()))
