"""The labelling dataset: source -> prepare (Ray tasks) -> model actors, one lazy streaming plan.

Nothing runs until the driver iterates the result. Ray Data streams it: read
tasks, prepare tasks and the model actors work at the same time on different
blocks, and back-pressure bounds what sits in between, so memory does not grow
with the input. Prepare tasks see windows of `GROUP_WINDOW_BATCHES` batches,
which they return ordered by input shape, so consecutive actor batches hold
images of one size.

Ray Data fuses a task step into the actors that follow it when both reserve the
same resources: with CPU-only actors of one CPU each, preparing runs inside the
actor processes (CPU-bound work gains nothing from shipping pixels between
processes); GPU actors, or actors reserving a fraction of a CPU, keep preparing
in separate tasks, so the accelerator only runs the model.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from detr.errors import RaydetrError
from pipelines.labelling.options import LabelOptions
from pipelines.labelling.panoptic_predictor import PanopticLabelPredictor
from pipelines.labelling.predictor import LabelPredictor
from pipelines.labelling.prepare import prepare_batch
from pipelines.sources import Source
from pipelines.sources.reader import read_source
from pipelines.training.transforms import TransformsConfig
from pipelines.validation.decode import DecodeLimits

if TYPE_CHECKING:
    from pipelines.inference.export_package import ExportPackage

TASK_CPUS = 1.0  # what one read or prepare task reserves (Ray Data's default)
GROUP_WINDOW_BATCHES = 4  # a prepare task orders this many actor batches' worth of images by shape...
MIN_ROWS_PER_READ_BLOCK = 8  # ...in blocks of at least this many rows; blocks are also what an actor receives:
# small ones even out the actors' last seconds
QUEUED_BATCHES_PER_ACTOR = 8  # prepared batches allowed to wait for each actor...
MIN_OBJECT_STORE_BUDGET = 256 * 2**20  # ...but never less than this in Ray's object store


def read_block_rows(options: LabelOptions) -> int:
    """Rows per read block: one prepare task's window of images, ordered by shape."""
    return max(MIN_ROWS_PER_READ_BLOCK, GROUP_WINDOW_BATCHES * options.batch_size)


def object_store_budget(options: LabelOptions, transforms: TransformsConfig) -> int:
    """Bytes of Ray's object store this dataset may fill. Decoding is far faster than the model, so
    without a budget of its own the prepare step would run ahead until Ray Data's default share of
    the store (a large fraction of memory) is full; this keeps a few batches queued per actor."""
    largest_image = 3 * transforms.eval_size * transforms.eval_max_size  # uint8 pixels at the model's input
    queued = options.concurrency * QUEUED_BATCHES_PER_ACTOR * options.batch_size * largest_image
    return max(MIN_OBJECT_STORE_BUDGET, queued)


def check_cluster_fits(options: LabelOptions, gpus_per_actor: float, resources: dict) -> None:
    """Refuse a layout the cluster cannot run: actors that leave no CPU for the read and decode tasks
    would wait for them forever. Raises ValueError with the numbers and a way out."""
    cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    actor_cpus = options.concurrency * options.cpus_per_actor
    if gpus_per_actor and options.concurrency * gpus_per_actor > gpus:
        raise RaydetrError(f"{options.concurrency} actors x {gpus_per_actor:g} GPUs need {options.concurrency * gpus_per_actor:g}"
                         f" GPUs; the cluster has {gpus:g}: lower --concurrency or --gpus-per-actor")
    if actor_cpus + TASK_CPUS > cpus:
        raise RaydetrError(
            f"{options.concurrency} actors x {options.cpus_per_actor:g} CPUs leave no CPU for reading and decoding "
            f"on a cluster of {cpus:g} CPUs; lower --concurrency, or reserve less per actor (e.g. "
            f"--cpus-per-actor {max(0.25, (cpus - TASK_CPUS) / options.concurrency):g}: each actor still runs "
            f"one torch thread)")


def build_label_dataset(source: Source, model: "bytes | ExportPackage", transforms: TransformsConfig,
                        options: LabelOptions, done: np.ndarray, gpus_per_actor: float = 0.0, listings: dict | None = None,
                        labelled: np.ndarray | None = None, contents: np.ndarray | None = None):
    """The result rows (schema.RESULT_SCHEMA, or PANOPTIC_RESULT_SCHEMA for the panoptic task) of labelling
    `source`, skipping keys whose digests are in `done` (sorted, see key_digests; `labelled` and `contents`:
    see `prepare.prepare_batch`); a lazy ray.data.Dataset.
    `listings`: the listings of a streamed folder started early (pipelines.sources.reader.start_listings)."""
    import ray

    prepared = read_source(source, rows_per_block=read_block_rows(options), listings=listings).map_batches(
        prepare_batch,
        batch_size=None,  # a read block each: one window of images ordered by shape
        batch_format="pyarrow",
        fn_kwargs={"done": done, "transforms": transforms, "limits": DecodeLimits(max_pixels=options.max_pixels),
                   "labelled": labelled, "contents": contents},
    )
    predictor, task_options = LabelPredictor, {}
    if options.task == "panoptic":
        predictor, task_options = PanopticLabelPredictor, {"panoptic_threshold": options.panoptic_threshold}
    results = prepared.map_batches(
        predictor,
        compute=ray.data.ActorPoolStrategy(size=options.concurrency),
        batch_size=options.batch_size,
        batch_format="pyarrow",
        num_cpus=options.cpus_per_actor,
        num_gpus=gpus_per_actor,
        udf_modifying_row_count=False,
        fn_constructor_kwargs={
            # A reference, not the bytes: the bytes would be pickled into the UDF itself (Ray warns at
            # ~100 MB, a ResNet-50 DETR is 160 MB) and copied for every actor; each actor fetches this once.
            "model": ray.put(model), "score_threshold": options.score_threshold, "top_k": options.top_k,
            "classes": options.classes, "draw": options.draw, "explain": options.explain,
            "threads": options.torch_threads,
            "precision": options.precision, "runtime": options.runtime, **task_options,
        },
    )
    limits = results.context.execution_options.resource_limits
    results.context.execution_options.resource_limits = limits.copy(
        object_store_memory=object_store_budget(options, transforms))
    return results
