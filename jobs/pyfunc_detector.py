"""The MLflow pyfunc model of a raydetr detector (an MLflow "model from code" file).

`mlflow.pyfunc.load_model(uri).predict(df)` takes a DataFrame with, per row, an
image as a file path or URI (column `path`) or as encoded bytes (column `image`),
and returns one row per input row: `boxes` (xyxy in the image's pixels),
`scores`, `labels` (category ids), `label_names`, `width`, `height`, and
`error` (empty, or why the image could not be read: the other rows still come
back). Params: `score_threshold` (default: the model's, `detr.default_score_threshold`: 0.5 for softmax
scores, 0.2 for a focal-loss model's sigmoid scores), `top_k` (default 100), and `eval_size` /
`eval_max_size`: the shorter side images are resized to and the longer side's cap (default: the model's
own; `eval_max_size` 0 keeps the model's ratio), to trade accuracy for speed, and `runtime`: `torch` (default),
or `onnxruntime` / `openvino` to run the model's ONNX export there (the export logged with the model when
it was logged with exports, else made on first use; the runtime must be installed where the model is
served: `raydetr[onnx]`, `raydetr[openvino]`).
A model with masks (panoptic) also returns `segments`: a JSON list per image of
{"id", "category_id", "label_name", "isthing", "area", "score", "bbox", "rle"}
(COCO RLE of the segment's pixels), from the panoptic merge with param
`panoptic_threshold` (default the paper's 0.85, `detr.config.PANOPTIC_THRESHOLD`); the boxes come from the same forward pass.
MLflow executes this file when it loads the model; the weights, categories and
preprocessing come from the raydetr checkpoint logged with it as an artifact.
"""
from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd

from detr.config import PANOPTIC_THRESHOLD
from detr.errors import RaydetrError


class DetectorPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from pipelines.inference.detector import Detector

        self.detector = Detector.from_checkpoint(context.artifacts["checkpoint"])
        self.sized, self.exported = {}, {"torch": self.detector}
        self.export_folders = {name.removeprefix("export_"): path for name, path in context.artifacts.items()
                               if name.startswith("export_")}

    def _in_runtime(self, runtime: str):
        """The model in an exported runtime: its logged export (the runtime's own format first), else
        exported now."""
        import dataclasses

        from pipelines.inference.detector import Detector
        from pipelines.inference.export_package import read_export_package

        own = "openvino" if runtime == "openvino" else "onnx"
        folder = self.export_folders.get(own) or next(iter(self.export_folders.values()), None)
        if folder is None:
            return dataclasses.replace(self.detector, runtime=runtime)
        return Detector.from_export(read_export_package(folder).for_runtime(runtime), runtime=runtime)

    def detector_at(self, size: int, max_size: int, runtime: str = "torch"):
        """The detector at this evaluation size in this runtime (the same model; kept per size and runtime
        asked: a runtime's export is made once, on first use)."""
        if runtime not in self.exported:
            self.exported[runtime] = self._in_runtime(runtime)
        base = self.exported[runtime]
        own = self.detector.transforms
        if (size, max_size or own.eval_max_size) == (own.eval_size, own.eval_max_size):
            return base
        if (size, max_size, runtime) not in self.sized:
            self.sized[(size, max_size, runtime)] = base.with_transforms(own.at_eval_size(size, max_size or None))
        return self.sized[(size, max_size, runtime)]

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from detr.postprocess import default_score_threshold
        from pipelines.storage import read_bytes
        from pipelines.validation.decode import decode_image
        from pipelines.validation.errors import PipelineError

        params = params or {}
        threshold = float(params.get("score_threshold", default_score_threshold(self.detector.config)))
        top_k = int(params.get("top_k", 100))
        detector = self.detector_at(int(params.get("eval_size", self.detector.transforms.eval_size)),
                                    int(params.get("eval_max_size", 0)), str(params.get("runtime", "torch")))
        panoptic = bool(self.detector.config.masks)
        columns = ["boxes", "scores", "labels", "label_names", "width", "height", "error"]
        if panoptic:
            import json

            from pipelines.inference.panoptic import segment_images

            columns.insert(-1, "segments")
        rows = []
        for _, row in model_input.iterrows():
            out = {"boxes": [], "scores": [], "labels": [], "label_names": [], "width": 0, "height": 0, "error": ""}
            if panoptic:
                out["segments"] = "[]"
            path = row.get("path") if "path" in row else None
            data = row.get("image") if "image" in row else None
            try:
                if data is None or (isinstance(data, float) and pd.isna(data)):
                    if not isinstance(path, str) or not path:
                        raise RaydetrError("row has neither an `image` (bytes) nor a `path`")
                    data = read_bytes(path)
                decoded = decode_image(bytes(data), path if isinstance(path, str) else "")
                if panoptic:
                    result = segment_images(detector, [decoded.array],
                                            float(params.get("panoptic_threshold", PANOPTIC_THRESHOLD)))[0]
                    det = result["detections"]
                    out["segments"] = json.dumps(result["segments"])
                else:
                    det = detector.detect([decoded.array])[0]
                keep = det["scores"] > threshold
                order = det["scores"][keep].argsort(descending=True)[:top_k]
                labels = det["labels"][keep][order].tolist()
                out.update(
                    boxes=det["boxes"][keep][order].tolist(),
                    scores=det["scores"][keep][order].tolist(),
                    labels=labels,
                    label_names=[self.detector.label_name(label) for label in labels],
                    width=decoded.width,
                    height=decoded.height,
                )
            except (PipelineError, OSError, ValueError) as exc:
                out["error"] = f"{type(exc).__name__}: {exc}"
            rows.append(out)
        return pd.DataFrame(rows, columns=columns)


mlflow.models.set_model(DetectorPyfunc())
