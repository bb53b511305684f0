"""A `Detector`: a loaded model with the preprocessing and post-processing it was trained with.

Images go in as decoded RGB arrays (see `pipelines.decode`), detections come out
in each image's own pixels. Every inference path uses this one class: the
labelling job's Ray Data actors, the MLflow pyfunc model, `detr predict`, and
the images with drawn detections that training logs. Preprocessing is the
evaluation transform of the model's training recipe (shorter side resized,
ImageNet normalisation); because the model is padding-invariant, how images are
grouped into batches does not change their detections.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from detr import DETR, PostProcess, pad_images
from detr.checkpoint import is_raydetr_checkpoint, load_checkpoint, read_checkpoint_file
from detr.coco_categories import coco_category_list
from detr.official import from_official
from detr.postprocess import Detections
from pipelines.transforms import TransformsConfig, apply_transform, build_eval_transform, normalize_image


def transforms_to_metadata(config: TransformsConfig) -> dict[str, Any]:
    """A TransformsConfig as plain data for a checkpoint's metadata."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


def transforms_from_metadata(data: Mapping[str, Any] | None) -> TransformsConfig:
    if not data:
        return TransformsConfig()
    return TransformsConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


@dataclass
class Detector:
    """Model + evaluation preprocessing + post-processing + category names."""

    model: DETR
    transforms: TransformsConfig
    categories: list[dict] | None = None
    score_threshold: float | None = None
    top_k: int | None = None
    device: torch.device | None = None

    def __post_init__(self) -> None:
        self.device = torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = self.model.to(self.device).eval()
        self._eval_transform = build_eval_transform(self.transforms)
        self._postprocess = PostProcess(self.score_threshold, self.top_k)
        self._names = {int(c["id"]): str(c["name"]) for c in (self.categories or [])}

    @classmethod
    def from_checkpoint(cls, source: str | os.PathLike | Mapping[str, Any], **options: Any) -> "Detector":
        """Load one of our checkpoints (config, weights, categories, transforms) or an official DETR file
        (COCO categories, the paper's evaluation transform, padding-invariant inference)."""
        raw = read_checkpoint_file(source) if not isinstance(source, Mapping) else source
        if is_raydetr_checkpoint(raw):
            model, metadata = load_checkpoint(raw)
            return cls(model, transforms_from_metadata(metadata.get("transforms")), metadata.get("categories"),
                       **options)
        model = from_official(raw, padding_invariant=True)
        categories = coco_category_list() if model.config.num_classes == 91 else None
        return cls(model, TransformsConfig(), categories, **options)

    def label_name(self, label: int) -> str:
        return self._names.get(int(label), str(int(label)))

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """HWC uint8 RGB -> normalised [3, h, w] float tensor at the evaluation size."""
        out = apply_transform(self._eval_transform, image, np.zeros((0, 4)), np.zeros((0,), np.int64), np.zeros((0,)))
        return normalize_image(out["image"], self.transforms.mean, self.transforms.std)

    @torch.inference_mode()
    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
        """Detections for each image, boxes as xyxy in the image's own pixels (one forward pass)."""
        if not images:
            return []
        tensors = [self.preprocess(img) for img in images]
        batch, mask = pad_images(tensors)
        outputs = self.model(batch.to(self.device), mask.to(self.device))
        sizes = torch.tensor([img.shape[:2] for img in images], device=self.device)
        return [{k: v.cpu() for k, v in det.items()} for det in self._postprocess(outputs, sizes)]
