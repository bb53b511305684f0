"""Panoptic inference with a `Detector` whose model has masks: one forward pass gives the detections and
the panoptic segments of each image, in the image's own pixels.

Masks are computed only for the queries the panoptic merge can keep (score above
the threshold, not "no object"): the expensive part of the mask head runs for a
handful of queries instead of all of them, with the same result.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from detr import PostProcess, masks_to_rle, pad_images
from detr.config import PANOPTIC_THRESHOLD
from detr.errors import RaydetrError
from pipelines.inference.detector import Detector


def is_thing_map(detector: Detector) -> dict[int, bool]:
    """{category id: isthing} from the detector's categories (a category without `isthing` is a thing)."""
    return {int(c["id"]): bool(c.get("isthing", 1)) for c in (detector.categories or [])}


@torch.inference_mode()
def segment_images(detector: Detector, images: Sequence[np.ndarray], threshold: float = PANOPTIC_THRESHOLD,
                   postprocess: PostProcess | None = None) -> list[dict[str, Any]]:
    """Per image: `detections` (as `Detector.detect` gives them), `id_map` (int64 [H, W] segment ids,
    0 = no segment) and `segments`: [{"id", "category_id", "label_name", "isthing", "area", "score",
    "bbox" (x, y, w, h), "rle" (COCO RLE, counts as str)}]."""
    if not images:
        return []
    return segment_preprocessed(detector, [detector.preprocess(img) for img in images],
                                [tuple(img.shape[:2]) for img in images], threshold, postprocess)


@torch.inference_mode()
def segment_preprocessed(detector: Detector, tensors: Sequence[torch.Tensor], original: Sequence[Sequence[int]],
                         threshold: float = PANOPTIC_THRESHOLD, postprocess: PostProcess | None = None) -> list[dict[str, Any]]:
    """`segment_images` for images already preprocessed (normalised float [3, h, w] at the evaluation
    size); `original` are the (height, width) the results are expressed in."""
    if not tensors:
        return []
    if not detector.config.masks:
        raise RaydetrError("panoptic inference needs a model with masks (DETRConfig.masks)")
    original = [tuple(int(v) for v in s) for s in original]
    batch, mask = pad_images(list(tensors))
    panoptic = detector.panoptic_postprocess(is_thing_map(detector), threshold)
    outputs = detector.forward(batch, mask, mask_queries=panoptic.queries_to_keep)
    processed = [tuple(t.shape[-2:]) for t in tensors]
    sizes = torch.tensor(original, device=detector.device)
    detections = (postprocess or detector.postprocess())(outputs, sizes)
    results = []
    for det, seg in zip(detections, panoptic(outputs, processed, original)):
        id_map = seg["id_map"].cpu()
        ids = [s["id"] for s in seg["segments_info"]]
        masks = torch.stack([id_map == i for i in ids]) if ids else torch.zeros((0, *id_map.shape), dtype=torch.bool)
        segments = []
        for s, score, rle, m in zip(seg["segments_info"], seg["scores"].tolist(), masks_to_rle(masks), masks):
            ys, xs = torch.nonzero(m, as_tuple=True)
            bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min()) + 1, int(ys.max() - ys.min()) + 1]
            segments.append({**s, "label_name": detector.label_name(s["category_id"]), "score": float(score),
                             "bbox": bbox, "rle": rle})
        results.append({"detections": {k: v.cpu() for k, v in det.items()}, "id_map": id_map, "segments": segments})
    return results


__all__ = ["is_thing_map", "segment_images", "segment_preprocessed"]
