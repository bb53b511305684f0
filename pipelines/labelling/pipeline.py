"""The labelling dataset: source -> prepare (Ray tasks) -> model actors, one lazy streaming plan.

Nothing runs until the driver iterates the result. Ray Data streams it: read
tasks, prepare tasks and the model actors work at the same time on different
blocks, and back-pressure bounds what sits in between, so memory does not grow
with the input. Prepare tasks see windows of `GROUP_WINDOW_BATCHES` batches,
which they return ordered by input shape, so consecutive actor batches hold
images of one size.
"""
from __future__ import annotations

import numpy as np

from pipelines.decode import DecodeLimits
from pipelines.labelling.options import LabelOptions
from pipelines.labelling.predictor import LabelPredictor
from pipelines.labelling.prepare import prepare_batch
from pipelines.sources import Source
from pipelines.transforms import TransformsConfig

GROUP_WINDOW_BATCHES = 4  # a prepare task orders this many actor batches' worth of images by shape
ROWS_PER_READ_BLOCK = 16


def build_label_dataset(source: Source, checkpoint: bytes, transforms: TransformsConfig, options: LabelOptions,
                        done: np.ndarray, gpus_per_actor: float = 0.0):
    """The result rows (schema.RESULT_SCHEMA) of labelling `source`, skipping keys whose digests are in
    `done` (sorted, see key_digests); a lazy ray.data.Dataset."""
    import ray

    prepared = source.read(rows_per_block=ROWS_PER_READ_BLOCK).map_batches(
        prepare_batch,
        batch_size=max(ROWS_PER_READ_BLOCK, GROUP_WINDOW_BATCHES * options.batch_size),
        batch_format="pyarrow",
        fn_kwargs={"done": done, "transforms": transforms, "limits": DecodeLimits(max_pixels=options.max_pixels)},
    )
    return prepared.map_batches(
        LabelPredictor,
        compute=ray.data.ActorPoolStrategy(size=options.concurrency),
        batch_size=options.batch_size,
        batch_format="pyarrow",
        num_cpus=options.cpus_per_actor,
        num_gpus=gpus_per_actor,
        udf_modifying_row_count=False,
        fn_constructor_kwargs={
            "checkpoint": checkpoint, "score_threshold": options.score_threshold, "top_k": options.top_k,
            "classes": options.classes, "draw": options.draw, "threads": options.torch_threads,
        },
    )
