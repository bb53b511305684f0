"""Ray Data actor for `detr label --task panoptic`: boxes and panoptic segments from one forward pass.

The same actor as `LabelPredictor` (model loaded once, batches split by padding,
error rows passed through); its forward pass is `segment_preprocessed`, which
computes masks only for the queries the panoptic merge keeps (`mask_queries`),
and each labelled image also gets its segments (COCO RLE at the original size)
and its segment-id PNG, encoded here so the driver only writes bytes.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import pyarrow as pa
import torch

from detr.errors import RaydetrError
from pipelines.inference.panoptic import segment_preprocessed
from pipelines.labelling.predictor import LabelPredictor, select_detections
from pipelines.labelling.schema import PANOPTIC_RESULT_SCHEMA
from pipelines.labelling.segments import segments_array
from pipelines.validation.panoptic import encode_panoptic_png

if TYPE_CHECKING:
    import ray

    from pipelines.inference.export_package import ExportPackage


class PanopticLabelPredictor(LabelPredictor):
    """Callable class for `map_batches`: PREPARED_SCHEMA batches in, PANOPTIC_RESULT_SCHEMA batches out."""

    def __init__(self, model: "bytes | ExportPackage | ray.ObjectRef", *, score_threshold: float | None,
                 panoptic_threshold: float, **options: Any) -> None:
        super().__init__(model, score_threshold=score_threshold, **options)
        if not self.detector.config.masks:
            raise RaydetrError("--task panoptic needs a model with a mask head (DETRConfig.masks)")
        self.panoptic_threshold = panoptic_threshold
        self.postprocess = self.detector.postprocess(score_threshold)

    def infer(self, images: Sequence[torch.Tensor], sizes: Sequence[tuple[int, int]]) -> list[dict]:
        """Per image: filtered `detections`, `segments` and `panoptic_png` (COCO panoptic PNG bytes)."""
        normalize = self.detector.preprocessing.normalize
        results = segment_preprocessed(self.detector, [normalize(img) for img in images], sizes,
                                       self.panoptic_threshold, self.postprocess)
        return [{"detections": select_detections(r["detections"], self.classes, self.top_k, size),
                 "segments": r["segments"], "panoptic_png": encode_panoptic_png(r["id_map"])}
                for r, size in zip(results, sizes)]

    def _result_table(self, batch: pa.Table, found: list[dict | None], previews: list,
                      explanations: list) -> pa.Table:
        table = super()._result_table(batch, found, previews, explanations)
        table = table.append_column("segments", segments_array([r["segments"] if r else None for r in found]))
        table = table.append_column("panoptic_png", pa.array([r["panoptic_png"] if r else None for r in found],
                                                             pa.binary()))
        return table.cast(PANOPTIC_RESULT_SCHEMA)
