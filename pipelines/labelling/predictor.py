"""Ray Data actor: the model, loaded once per actor, turns prepared images into detection rows.

`map_batches(LabelPredictor, compute=ActorPoolStrategy(size=N), ...)` keeps N
actors alive for the whole job; each loads the model once (checkpoint bytes, or an export's package, that
travel through the object store, so actors on any node can load a model the
driver downloaded) as the Detector's inference copy (norms folded, channels-last,
optionally bfloat16), runs on a GPU when Ray gave it one, with one torch thread per
reserved CPU otherwise, under `torch.inference_mode`. A batch is split where
padding would waste too much (`shapes.padding_groups`); rows that failed to
decode pass through with their error reason. `infer` is the one forward pass per
group: `PanopticLabelPredictor` replaces it (and adds its result columns). With
`explain`, an actor's first N images also get their attention pictures
(`pipelines.inference.explain`: one more forward pass each, on the model-size image).
"""
from __future__ import annotations

import io
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pyarrow as pa
import torch

from pipelines.inference.detector import Detector
from pipelines.inference.drawing import draw_detections
from pipelines.labelling.prepare import pixels_array
from pipelines.labelling.schema import RESULT_SCHEMA
from pipelines.labelling.shapes import DEFAULT_MAX_WASTE, padding_groups

if TYPE_CHECKING:
    import ray

    from pipelines.inference.export_package import ExportPackage


def select_detections(detections: dict, classes: Sequence[int] | None, top_k: int | None,
                      size: Sequence[int] | None = None) -> dict:
    """Keep the detections of `classes` (None: all), best first, at most `top_k` (None: all); with the image's
    `size` (height, width), boxes are clipped to it (DETR's boxes may reach past the border, as the
    official post-processing leaves them; a labelled dataset's boxes lie in their image)."""
    from torchvision.ops import clip_boxes_to_image

    scores, labels = detections["scores"], detections["labels"]
    keep = torch.ones_like(labels, dtype=torch.bool) if classes is None else torch.isin(
        labels, torch.as_tensor(list(classes), dtype=labels.dtype))
    index = keep.nonzero().flatten()
    index = index[scores[index].argsort(descending=True, stable=True)][:top_k]
    selected = {name: value[index] for name, value in detections.items()}
    if size is not None:
        selected["boxes"] = clip_boxes_to_image(selected["boxes"], (int(size[0]), int(size[1])))
    return selected


class LabelPredictor:
    """Callable class for `map_batches`: PREPARED_SCHEMA batches in, RESULT_SCHEMA batches out."""

    def __init__(self, model: "bytes | ExportPackage | ray.ObjectRef", *, score_threshold: float | None,
                 top_k: int | None, classes: Sequence[int] | None, draw: int = 0, threads: int = 1,
                 precision: str = "float32", runtime: str = "torch", max_waste: float = DEFAULT_MAX_WASTE,
                 explain: int = 0) -> None:
        # top_k is applied after the class filter (select_detections), so the Detector keeps them all.
        self.detector = Detector.in_actor(model, threads, score_threshold=score_threshold, precision=precision,
                                          runtime=runtime)
        self.classes, self.top_k, self.max_waste = classes, top_k, max_waste
        self.draw_left = draw  # each actor draws its first N images; the driver keeps the first N overall
        self.explain_left = explain  # likewise for attention pictures

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        reasons = batch["error_reason"].to_pylist()
        heights, widths = batch["height"].to_pylist(), batch["width"].to_pylist()
        input_shapes = list(zip(batch["input_height"].to_pylist(), batch["input_width"].to_pylist()))
        pixels = batch["pixels"]
        ok = [i for i in range(n) if not reasons[i]]
        found: list[dict | None] = [None] * n
        images: dict[int, torch.Tensor] = {}
        for group in padding_groups([input_shapes[i] for i in ok], self.max_waste):
            rows = [ok[g] for g in group]
            for i in rows:
                images[i] = torch.from_numpy(pixels_array(pixels[i].as_py(), *input_shapes[i]).copy())
            for i, result in zip(rows, self.infer([images[i] for i in rows], [(heights[i], widths[i]) for i in rows])):
                found[i] = result
        detections = [r["detections"] if r is not None else None for r in found]
        previews = [self._preview(images[i], detections[i], heights[i], widths[i]) if i in images else None
                    for i in range(n)]
        explanations = [self._explain(images[i]) if i in images else None for i in range(n)]
        return self._result_table(batch, found, previews, explanations)

    def infer(self, images: Sequence[torch.Tensor], sizes: Sequence[tuple[int, int]]) -> list[dict]:
        """One padded forward pass over resized uint8 images -> per image {"detections": ...} (filtered),
        expressed in the original `sizes` (height, width)."""
        return [{"detections": select_detections(det, self.classes, self.top_k, size)}
                for det, size in zip(self.detector.detect_resized(images, sizes), sizes)]

    def _preview(self, image, detections: dict, height: int, width: int) -> bytes | None:
        """PNG of the model-size image with the boxes drawn (boxes scaled from the original size)."""
        if self.draw_left <= 0:
            return None
        self.draw_left -= 1
        scale = np.array([image.shape[2] / width, image.shape[1] / height] * 2, dtype=np.float32)
        scaled = dict(detections, boxes=detections["boxes"] * torch.from_numpy(scale))
        buffer = io.BytesIO()
        draw_detections(image.permute(1, 2, 0).numpy(), scaled, self.detector.label_name, -1.0).save(buffer, "PNG")
        return buffer.getvalue()

    def _explain(self, image: torch.Tensor) -> list[bytes] | None:
        """[decoder PNG, encoder PNG] of the model-size image (at each detection's centre), for the first N."""
        if self.explain_left <= 0:
            return None
        from pipelines.inference.explain import explain_image
        from pipelines.inference.explain_drawing import draw_decoder_attention, plot_encoder_attention

        self.explain_left -= 1
        explanation = explain_image(self.detector, image.permute(1, 2, 0).numpy(), top_k=self.top_k or 10)
        decoder, encoder = io.BytesIO(), io.BytesIO()
        draw_decoder_attention(explanation, self.detector.label_name).save(decoder, "PNG")
        plot_encoder_attention(explanation, encoder)
        return [decoder.getvalue(), encoder.getvalue()]

    def _result_table(self, batch: pa.Table, found: list[dict | None], previews: list,
                      explanations: list) -> pa.Table:
        empty = {"boxes": [], "scores": [], "labels": []}
        dets = [{k: v.tolist() for k, v in r["detections"].items()} if r is not None else empty for r in found]
        columns = {name: batch[name] for name in
                   ("key", "source", "image_id", "width", "height", "content_hash", "error_reason", "error_detail")}
        columns["boxes"] = pa.array([d["boxes"] for d in dets], RESULT_SCHEMA.field("boxes").type)
        columns["scores"] = pa.array([d["scores"] for d in dets], RESULT_SCHEMA.field("scores").type)
        columns["labels"] = pa.array([d["labels"] for d in dets], RESULT_SCHEMA.field("labels").type)
        columns["label_names"] = pa.array([[self.detector.label_name(x) for x in d["labels"]] for d in dets],
                                          RESULT_SCHEMA.field("label_names").type)
        columns["preview_png"] = pa.array(previews, pa.binary())
        columns["explain_pngs"] = pa.array(explanations, pa.list_(pa.binary()))
        return pa.Table.from_arrays([columns[f.name] for f in RESULT_SCHEMA], schema=RESULT_SCHEMA)

