"""Ray Data actors that evaluation runs: each loads the model once (`Detector.in_actor`, the loader every
job uses; in `runtime`, the model's export in ONNX Runtime or OpenVINO, or PyTorch) and turns batches of
evaluation samples (images at the model's evaluation size, with their targets) into predictions, carried with the ground truth the driver scores them against."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import torch

from detr import boxes_only, masks_to_rle
from detr.postprocess import class_probabilities
from pipelines.inference.detector import Detector
from pipelines.training.collate import collate_samples
from pipelines.validation.panoptic import encode_panoptic_png

if TYPE_CHECKING:
    import ray

    from pipelines.inference.export_package import ExportPackage


class EvalPredictor:
    """Detections and ground-truth boxes per image, boxes in original pixels; with `analysis`, also the
    detections after each decoder layer (`layer_*`: [L, N, ...], the first layer first; only the last where
    the model has no auxiliary outputs) and the last layer's boxes as the model predicts them, per query
    (`slot_boxes`: normalised cx, cy, w, h), for `pipelines.evaluation.analysis`."""

    def __init__(self, model: "bytes | ExportPackage | ray.ObjectRef", threads: int = 1,
                 runtime: str = "torch", analysis: bool = False) -> None:
        self.detector = Detector.in_actor(model, threads, runtime=runtime)
        self.postprocess = self.detector.postprocess()
        self.analysis = analysis

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        transforms = self.detector.transforms
        images, mask, targets = collate_samples(batch, transforms.mean, transforms.std)
        outputs = self.detector.forward(images, mask, mask_queries=boxes_only)
        sizes = torch.stack([t["orig_size"] for t in targets])
        detections = self.postprocess(outputs, sizes)
        analysed = self._per_layer(outputs, sizes) if self.analysis else {}
        return {**analysed,
            "image_id": np.asarray([int(t["image_id"]) for t in targets], dtype=np.int64),
            "det_boxes": [d["boxes"].numpy() for d in detections],
            "det_scores": [d["scores"].numpy() for d in detections],
            "det_labels": [d["labels"].numpy() for d in detections],
            "gt_boxes": [t["boxes"].numpy() for t in targets],
            "gt_labels": [t["labels"].numpy() for t in targets],
            "area": [t["area"].numpy() for t in targets],
            "iscrowd": [t["iscrowd"].numpy() for t in targets],
            "orig_size": np.stack([t["orig_size"].numpy() for t in targets]),
            "size": np.stack([t["size"].numpy() for t in targets]),
        }

    def _per_layer(self, outputs: dict, sizes: torch.Tensor) -> dict[str, Any]:
        """Each decoder layer's outputs post-processed as the last layer's are for AP (so the last layer's
        AP is the evaluation's), boxes in original pixels: [B, L, N, ...] arrays."""
        layers = [*outputs.get("aux_outputs", []), outputs]
        per_layer = [self.postprocess(layer, sizes) for layer in layers]
        stacked = {f"layer_{name}": torch.stack([torch.stack([d[name] for d in layer]) for layer in per_layer], 1)
                   for name in ("scores", "labels", "boxes")}
        return {**{k: list(v.float().cpu().numpy() if k != "layer_labels" else v.cpu().numpy())
                   for k, v in stacked.items()},
                "slot_boxes": list(outputs["pred_boxes"].float().cpu().numpy()),
                "slot_scores": list(class_probabilities(outputs, self.postprocess.sigmoid).max(-1).values
                                    .float().cpu().numpy())}


class PanopticEvalPredictor:
    """A model with masks -> per image the panoptic segmentation (PNG and segments) and the thing
    instances' masks (COCO RLE results), both at the original image size."""

    def __init__(self, model: "bytes | ExportPackage | ray.ObjectRef", is_thing: Mapping[int, bool],
                 threshold: float, threads: int = 1, runtime: str = "torch") -> None:
        self.detector = Detector.in_actor(model, threads, runtime=runtime)
        self.is_thing = {int(k): bool(v) for k, v in is_thing.items()}
        self.panoptic = self.detector.panoptic_postprocess(self.is_thing, threshold)
        self.instances = self.detector.instance_postprocess()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        transforms = self.detector.transforms
        images, mask, targets = collate_samples(batch, transforms.mean, transforms.std)
        outputs = self.detector.forward(images, mask)  # every query's mask: mask AP ranks all detections
        processed = [tuple(int(v) for v in t["size"]) for t in targets]
        original = [tuple(int(v) for v in t["orig_size"]) for t in targets]
        pngs, segments, results = [], [], []
        for seg, inst in zip(self.panoptic(outputs, processed, original),
                             self.instances(outputs, processed, original)):
            pngs.append(encode_panoptic_png(seg["id_map"]))
            segments.append(json.dumps(seg["segments_info"]))
            things = [i for i, label in enumerate(inst["labels"].tolist()) if self.is_thing.get(label, True)]
            rles = masks_to_rle(inst["masks"][things]) if things else []
            results.append(json.dumps([
                {"category_id": int(inst["labels"][i]), "score": float(inst["scores"][i]), "segmentation": rle}
                for i, rle in zip(things, rles)]))
        return {
            "image_id": np.asarray([int(t["image_id"]) for t in targets], dtype=np.int64),
            "panoptic_png": pngs,
            "segments_info": segments,
            "mask_results": results,
        }
