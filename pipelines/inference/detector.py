"""A `Detector`: a loaded model with the preprocessing and post-processing it was trained with.

Images go in as decoded RGB arrays (see `pipelines.validation.decode`), detections come out
in each image's own pixels. Every inference path uses this one class: the
labelling job's Ray Data actors, the MLflow pyfunc model, `detr predict`, and
the images with drawn detections that training logs. Preprocessing is the
evaluation transform of the model's training recipe (shorter side resized,
ImageNet normalisation); because the model is padding-invariant, how images are
grouped into batches does not change their detections. The Detector runs an
inference copy of the model (`detr.inference_model`: norms folded into the
convolutions, channels-last; bfloat16 weights with `precision="bfloat16"`), which
gives the original's outputs to float32 rounding, faster; the model passed in is
left as it is. With `runtime="onnxruntime"` or `"openvino"` the forward pass runs the model's ONNX export
in that runtime instead (`pipelines.inference.runtimes`); everything else stays the same. A Detector can also
hold an export alone (`from_export`: a `detr export` folder's package, float32 or int8), with no PyTorch
model: its metadata carries the config, preprocessing and classes.
"""
from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch

from detr import (InstanceMaskPostProcess, PanopticPostProcess, PostProcess, boxes_only, forward_inference,
                  inference_model, mask_postprocess_options, pad_images, scored_by_sigmoid)
from detr.checkpoint import is_raydetr_checkpoint, load_checkpoint, read_checkpoint_file
from detr.coco_categories import coco_category_list
from detr.errors import RaydetrError
from detr.official import from_official
from detr.postprocess import Detections
from pipelines.training.transforms import TransformsConfig, apply_transform, build_eval_transform, normalize_image

if TYPE_CHECKING:
    import ray

    from pipelines.inference.export_package import ExportPackage


def transforms_to_metadata(config: TransformsConfig) -> dict[str, Any]:
    """A TransformsConfig as plain data for a checkpoint's metadata."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


def transforms_from_metadata(data: Mapping[str, Any] | None) -> TransformsConfig:
    if not data:
        return TransformsConfig()
    return TransformsConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


@dataclass
class EvalPreprocessing:
    """The model's evaluation preprocessing in two steps: `resize` (uint8 in, uint8 out, so it is cheap
    to ship between processes: the labelling job resizes in Ray tasks, ahead of its model actors) and
    `normalize` (ImageNet normalisation, done next to the model)."""

    transforms: TransformsConfig

    def __post_init__(self) -> None:
        self._resize = build_eval_transform(self.transforms)

    def resize(self, image: np.ndarray) -> torch.Tensor:
        """HWC uint8 RGB -> uint8 [3, h, w] at the evaluation size."""
        empty = np.zeros((0,))
        return apply_transform(self._resize, image, np.zeros((0, 4)), empty.astype(np.int64), empty)["image"]

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 [3, h, w] -> normalised float [3, h, w]."""
        return normalize_image(image, self.transforms.mean, self.transforms.std)


@dataclass
class Detector:
    """Model + evaluation preprocessing + post-processing + category names."""

    model: torch.nn.Module | None  # a DETR, or one inside DETRsegm (masks); None: `export` runs alone
    transforms: TransformsConfig
    categories: list[dict] | None = None
    score_threshold: float | None = None
    top_k: int | None = None
    device: torch.device | None = None
    precision: str = "float32"  # or "bfloat16" (detr.PRECISIONS): faster on AMX CPUs and GPUs, ~1e-2 in scores
    optimize: bool = True  # run an inference copy (detr.inference_model); False: the model as given
    runtime: str = "torch"  # or "onnxruntime", "openvino" (pipelines.inference.runtimes.RUNTIMES): the export runs
    threads: int | None = None  # the exported model's threads (None: torch's); the torch runtime uses torch's
    export: "ExportPackage | None" = None  # with model None: an export, run in `runtime`

    def __post_init__(self) -> None:
        self._runner = None
        if self.model is None:
            self._init_export()
        else:
            self._init_model()
        self.preprocessing = EvalPreprocessing(self.transforms)
        self._postprocess = self.postprocess(self.score_threshold, self.top_k)
        self._names = {int(c["id"]): str(c["name"]) for c in (self.categories or [])}

    def _init_export(self) -> None:
        from detr.config import DETRConfig

        if self.export is None:
            raise ValueError("a Detector needs a model or an export")
        if self.precision not in ("float32", self.export.precision):
            raise RaydetrError(f"the export is {self.export.precision}; precision {self.precision} is not its own")
        self.config, self.precision = DETRConfig.from_dict(self.export.metadata["config"]), self.export.precision
        self._runner = self.export.runner(self.runtime, self.threads or torch.get_num_threads())
        self.device = torch.device("cpu")

    def _init_model(self) -> None:
        self.config = self.model.config
        if self.runtime != "torch":
            from pipelines.inference.runtimes import exported_runner

            if self.precision != "float32":
                raise RaydetrError(f"the {self.runtime} runtime runs float32 models; precision {self.precision} "
                                   "is the torch runtime's")
            self._runner = exported_runner(self.runtime, self.model, self.threads)
        self.device = torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        settings = self.model.inference_settings
        if settings is not None:  # made by the caller (from_checkpoint converts the model it loaded in place)
            if not self.optimize or settings.precision != self.precision:
                raise RaydetrError(f"the model is an inference model in {settings.precision}; expected "
                                 f"{'a plain model' if not self.optimize else self.precision}")
            self.model = self.model.to(self.device)
        elif self.optimize:
            self.model = inference_model(self.model.to(self.device), self.precision)
        elif self.precision != "float32":
            raise RaydetrError("precision other than float32 needs optimize=True (an inference copy of the model)")
        else:
            self.model = self.model.to(self.device).eval()

    @classmethod
    def from_checkpoint(cls, source: str | os.PathLike | Mapping[str, Any], **options: Any) -> "Detector":
        """Load one of our checkpoints (config, weights, categories, transforms) or an official DETR file
        (COCO categories, the paper's evaluation transform, padding-invariant inference)."""
        raw = read_checkpoint_file(source) if not isinstance(source, Mapping) else source
        if is_raydetr_checkpoint(raw):
            model, metadata = load_checkpoint(raw)
            transforms, categories = transforms_from_metadata(metadata.get("transforms")), metadata.get("categories")
        else:
            model = from_official(raw, padding_invariant=True)
            transforms = TransformsConfig()
            categories = coco_category_list() if model.config.num_classes == 91 else None
        if options.get("optimize", True):  # the loaded model is ours: convert it rather than a copy of it
            model = inference_model(model, options.get("precision", "float32"), inplace=True)
        return cls(model, transforms, categories, **options)

    @classmethod
    def from_export(cls, package: "ExportPackage", **options: Any) -> "Detector":
        """An export (`pipelines.inference.export_package`) in its own runtime, or in `runtime=`; the
        preprocessing, classes and scoring from its metadata."""
        metadata = package.metadata
        options = {"runtime": package.runtime, **options, "optimize": False}
        return cls(None, transforms_from_metadata(metadata.get("transforms")), metadata.get("categories") or None,
                   export=package, **options)

    @classmethod
    def in_actor(cls, model: "bytes | ExportPackage | ray.ObjectRef", threads: int = 1,
                 **options: Any) -> "Detector":
        """`from_checkpoint` (checkpoint bytes) or `from_export` (a package) inside a Ray actor, given the
        model or its object-store reference (so an actor on any node loads a model the driver read), with
        `threads` threads."""
        from pipelines.inference.export_package import ExportPackage

        torch.set_num_threads(threads)
        if not isinstance(model, (bytes, bytearray, memoryview, ExportPackage)):
            import ray

            model = ray.get(model)
        if isinstance(model, ExportPackage):
            return cls.from_export(model, threads=threads, **options)
        return cls.from_checkpoint(bytes(model), threads=threads, **options)

    def with_transforms(self, transforms: TransformsConfig) -> "Detector":
        """This detector with other preprocessing (another evaluation size): the same model, runtime and
        post-processing, nothing rebuilt or exported again (the exported graph takes any size)."""
        other = copy.copy(self)
        other.transforms, other.preprocessing = transforms, EvalPreprocessing(transforms)
        return other

    def postprocess(self, score_threshold: float | None = None, top_k: int | None = None) -> PostProcess:
        """Detections from this model's outputs, scored as it was trained (sigmoids after the focal loss)."""
        return PostProcess(score_threshold, top_k, sigmoid=scored_by_sigmoid(self.config))

    def panoptic_postprocess(self, is_thing: Mapping[int, bool], threshold: float) -> PanopticPostProcess:
        """The panoptic merge for this model's outputs (its scoring and its treatment of padding)."""
        return PanopticPostProcess(is_thing, threshold, **mask_postprocess_options(self.config))

    def instance_postprocess(self) -> InstanceMaskPostProcess:
        """Every query with its binary mask, for this model's outputs."""
        return InstanceMaskPostProcess(**mask_postprocess_options(self.config))

    def label_name(self, label: int) -> str:
        return self._names.get(int(label), str(int(label)))

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """HWC uint8 RGB -> normalised [3, h, w] float tensor at the evaluation size."""
        return self.preprocessing.normalize(self.preprocessing.resize(image))

    @torch.inference_mode()
    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
        """Detections for each image, boxes as xyxy in the image's own pixels (one forward pass)."""
        if not images:
            return []
        return self.detect_resized([self.preprocessing.resize(img) for img in images],
                                   [img.shape[:2] for img in images])

    @torch.inference_mode()
    def detect_resized(self, images: Sequence[torch.Tensor], sizes: Sequence[Sequence[int]]) -> list[Detections]:
        """`detect` for images already resized by `preprocessing.resize` (uint8 [3, h, w]); `sizes` are
        the original (height, width) that the boxes are expressed in."""
        if not images:
            return []
        batch, mask = pad_images([self.preprocessing.normalize(img) for img in images])
        outputs = self.forward(batch, mask, mask_queries=boxes_only)
        target_sizes = torch.as_tensor([tuple(int(v) for v in s) for s in sizes], device=self.device)
        return [{k: v.cpu() for k, v in det.items()} for det in self._postprocess(outputs, target_sizes)]

    def forward(self, images: torch.Tensor, mask: torch.Tensor, **kwargs: Any) -> dict:
        """The model's raw outputs for a padded, normalised batch (`detr.forward_inference`: inputs moved to
        the model's device, precision and memory format; main outputs in float32). An exported model computes
        every query's mask (`mask_queries` selects nothing there)."""
        if self._runner is not None:
            return self._runner(images, mask)
        return forward_inference(self.model, images, mask, **kwargs)
