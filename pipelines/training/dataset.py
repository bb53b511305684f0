"""The training and evaluation datasets: any source -> augmented samples, streamed by Ray Data.

`build_detection_dataset` chains: read records -> (shuffle block order) -> load,
validate and transform in parallel tasks -> (group by aspect ratio). Bad records
never reach the model; they are reported to an `ErrorCollector`. Feed the result
to Ray Train as a dataset and, in each worker,
`ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=B, collate_fn=DetectionCollate())`.

Reproducibility: each image's augmentation is seeded from (seed, epoch, image id).
A training dataset reads the epoch from its `EpochClock`, which the training loop
sets before each epoch (`DetectionDataset.set_epoch`), so a run resumed at epoch k
sees exactly the augmentations of the original run (block order, which Ray Data
reshuffles on each reading, may differ).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from pipelines.sources import Source, open_source
from pipelines.sources.reader import read_source
from pipelines.training.epoch_clock import EpochClock
from pipelines.training.samples import MASK_COLUMN, SAMPLE_COLUMNS, make_sample
from pipelines.training.transforms import TransformsConfig, build_transform
from pipelines.validation.decode import DecodeLimits
from pipelines.validation.error_collector import ErrorCollector
from pipelines.validation.errors import RunSummary
from pipelines.validation.loading import tally

STREAMED_KINDS = ("archive", "parquet")


@functools.lru_cache(maxsize=8)
def _cached_transform(config: TransformsConfig, train: bool):
    return build_transform(config, train)


def _prepare_batch(
    batch: pa.Table,
    config: TransformsConfig,
    train: bool,
    seed: int | None,
    epoch: int,
    clock: EpochClock | None,
    known_categories: frozenset[int] | None,
    limits: DecodeLimits,
    collector: ErrorCollector | None,
    with_masks: bool = False,
) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)  # one Ray CPU per task: intra-op threads would only oversubscribe the cores
    transform = _cached_transform(config, train)
    if clock is not None:
        epoch = clock.get()
    samples, errors, summary = [], [], RunSummary()
    for record in batch.to_pylist():
        sample, loaded, errs = make_sample(record, transform, seed=seed, epoch=epoch,
                                           known_categories=known_categories, limits=limits,
                                           with_masks=with_masks or None)
        tally(summary, loaded, errs)
        errors += errs
        if sample is not None:
            samples.append(sample)
    if collector is not None:
        collector.report(epoch, summary, errors)
    return _columns(samples)


def _columns(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Samples -> a batch dict; ragged columns stay lists of arrays (Ray stores them as tensors)."""
    out: dict[str, Any] = {}
    names = SAMPLE_COLUMNS + ((MASK_COLUMN,) if any(MASK_COLUMN in s for s in samples) else ())
    for s in samples:
        if MASK_COLUMN in names and MASK_COLUMN not in s:
            s[MASK_COLUMN] = np.zeros((0, *np.asarray(s["size"]).tolist()), dtype=bool)
    for name in names:
        values = [s[name] for s in samples]
        if name in ("image_id",):
            out[name] = np.asarray(values, dtype=np.int64)
        elif name in ("orig_size", "size"):
            out[name] = np.asarray(values, dtype=np.int64).reshape(-1, 2)
        else:
            out[name] = values
    return out


def _group_by_aspect_ratio(batch: dict[str, Any]) -> dict[str, Any]:
    """Order a window of samples by aspect ratio so consecutive batches pad less."""
    sizes = np.asarray(batch["size"]).reshape(-1, 2)
    order = np.argsort(sizes[:, 0] / np.maximum(sizes[:, 1], 1), kind="stable")
    return {k: [v[i] for i in order] if isinstance(v, list) else np.asarray(v)[order] for k, v in batch.items()}


@dataclass
class DetectionDataset:
    """A streaming dataset of samples plus where its rejected records are collected."""

    dataset: Any  # ray.data.Dataset of SAMPLE_COLUMNS
    errors: ErrorCollector | None
    categories: list[dict] | None
    source: Source
    clock: EpochClock | None = None
    """Training datasets: the epoch their augmentation is seeded with (None: a fixed epoch)."""

    def set_epoch(self, epoch: int) -> None:
        """Seed the next reading's augmentation with `epoch` (call it before each epoch)."""
        if self.clock is None:
            raise ValueError("set_epoch needs a training dataset (build_detection_dataset(train=True))")
        self.clock.set(epoch)

    def iter_batches(self, batch_size: int, **kwargs) -> Iterator:
        """(images, mask, targets) batches on this process (evaluation, tests, single-node use)."""
        from pipelines.training.collate import DetectionCollate

        return self.dataset.iter_torch_batches(batch_size=batch_size, collate_fn=DetectionCollate(), **kwargs)


def build_detection_dataset(
    source: Source | str,
    *,
    train: bool,
    transforms: TransformsConfig = TransformsConfig(),
    seed: int | None = 0,
    epoch: int = 0,
    shuffle: bool | None = None,
    group_aspect_ratio_window: int = 0,
    collect_errors: bool = True,
    limits: DecodeLimits = DecodeLimits(),
    rows_per_block: int = 16,
    concurrency: int | None = None,
) -> DetectionDataset:
    """Build the streaming sample dataset for training (`train=True`) or evaluation.

    A training dataset's augmentation is seeded with `epoch` until `set_epoch` changes it.

    `shuffle` (default: `train`) randomises block order per epoch, reproducibly
    under `seed` (not for archives and shards, which stream); add `local_shuffle_buffer_size`/`local_shuffle_seed` in
    `iter_torch_batches` to mix rows within a window. `group_aspect_ratio_window`
    > 0 sorts windows of that many samples by aspect ratio (use a multiple of the
    batch size) to cut padding. `seed=None` draws augmentations unseeded.
    """
    from ray.data import RandomSeedConfig

    src = open_source(source) if isinstance(source, str) else source
    known = src.category_ids
    collector = ErrorCollector.create() if collect_errors else None
    clock = EpochClock.create(epoch) if train else None
    if collector is not None and src.planning_errors:
        collector.report(epoch, RunSummary.of_planning(src.planning_errors), src.planning_errors)
    ds = read_source(src, rows_per_block=rows_per_block)
    if (shuffle if shuffle is not None else train) and src.kind not in STREAMED_KINDS:
        # Block order is shuffled per epoch for planned sources, whose records carry no bytes.
        # Streamed sources (archives, shards) would be held whole by this all-to-all step:
        # mix them with iter_torch_batches(local_shuffle_buffer_size=..., local_shuffle_seed=...).
        ds = ds.randomize_block_order(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))
    ds = ds.map_batches(
        _prepare_batch,
        batch_format="pyarrow",
        batch_size=None,  # a read block (at most rows_per_block records) each; a batch size would bundle blocks
        # of planned records, whose read fuses with this step, `batch_size` blocks to a task
        concurrency=concurrency,
        fn_kwargs={
            "config": transforms,
            "train": train,
            "seed": seed,
            "epoch": epoch,
            "clock": clock,
            "known_categories": None if known is None else frozenset(known),
            "limits": limits,
            "collector": collector,
            "with_masks": src.is_panoptic,
        },
    )
    if group_aspect_ratio_window > 0:
        ds = ds.map_batches(_group_by_aspect_ratio, batch_size=group_aspect_ratio_window, batch_format="numpy")
    return DetectionDataset(ds, collector, src.categories, src, clock)
