"""The labelling job's settings: one dataclass holds every default, and the class filter's parser.

Settings that change what a row says (the task, threshold, top-k, classes, the
model's precision, runtime and evaluation size, and the panoptic threshold of `--task panoptic`) are recorded in the output's
manifest; a re-run into the same output must use the same ones, so that every
row of a dataset means the same thing.
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Sequence

from detr.config import PANOPTIC_THRESHOLD
from detr.errors import RaydetrError
from pipelines.validation.decode import DEFAULT_MAX_PIXELS

if TYPE_CHECKING:
    from pipelines.training.transforms import TransformsConfig

TASKS = ("detection", "panoptic")
PRECISIONS = ("float32", "bfloat16")  # detr.PRECISIONS, named here so the CLI does not import torch
EXPORT_PRECISIONS = ("float32", "int8")  # an export's (pipelines.inference.export_folder.PRECISIONS)
RUNTIMES = ("torch", "onnxruntime", "openvino")  # pipelines.inference.runtimes.RUNTIMES, likewise


@dataclass(frozen=True)
class LabelOptions:
    """How to label: the task, detection filters, parallelism, and how often rows are committed."""

    task: str = "detection"  # "panoptic": also the segments and a panoptic PNG per image (a model with masks)
    panoptic_threshold: float = PANOPTIC_THRESHOLD  # panoptic: keep queries whose top probability exceeds this
    score_threshold: float | None = None  # keep detections scoring above this (None: the model's default)
    top_k: int | None = None  # then keep at most this many per image, best first
    classes: tuple[int, ...] | None = None  # category ids to keep (None: all)
    precision: str = "float32"  # the model's weights and activations (bfloat16: faster, scores within ~1e-2;
    # int8: an int8 export's, set from the export)
    runtime: str | None = None  # where the model runs: PyTorch, or its ONNX export in onnxruntime or openvino
    # (None: the model's own, torch for a checkpoint and the export's runtime for an export folder)
    eval_size: int | None = None  # shorter side the images are resized to (None: the model's own)
    eval_max_size: int | None = None  # longer side at most (None: the model's ratio to the shorter side)
    batch_size: int = 8  # images per forward pass
    concurrency: int = 1  # model actors
    cpus_per_actor: float = 1.0  # also the actor's torch threads (at least 1)
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    rows_per_file: int = 1000  # rows per committed Parquet file...
    commit_seconds: float = 30.0  # ...or fewer, when this long has passed since the last commit
    draw: int = 0  # PNG previews with drawn boxes for the first N images labelled
    explain: int = 0  # attention pictures (decoder per detection, encoder at their centres) for the first N
    max_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb limit per image
    allow_outside_paths: bool = False  # read images an annotation file names outside its folder, or links out

    def __post_init__(self) -> None:
        problems = []
        if self.task not in TASKS:
            problems.append(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.precision not in PRECISIONS + EXPORT_PRECISIONS:
            problems.append(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.runtime is not None and self.runtime not in RUNTIMES:
            problems.append(f"runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        elif self.runtime == "torch" and self.precision not in PRECISIONS:
            problems.append(f"precision {self.precision} is an export's: the torch runtime runs "
                            f"{' or '.join(PRECISIONS)}")
        elif self.runtime not in (None, "torch") and self.precision not in EXPORT_PRECISIONS:
            problems.append(f"the {self.runtime} runtime runs float32 or int8 exports (precision {self.precision} "
                            "is torch's)")
        if self.top_k is not None and self.top_k < 1:
            problems.append(f"top_k must be >= 1, got {self.top_k}")
        for name in ("batch_size", "concurrency", "rows_per_file", "max_pixels"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.cpus_per_actor <= 0:
            problems.append(f"cpus_per_actor must be > 0, got {self.cpus_per_actor}")
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            problems.append(f"gpus_per_actor must be >= 0, got {self.gpus_per_actor}")
        if self.eval_size is not None and self.eval_size < 1:
            problems.append(f"eval_size must be >= 1, got {self.eval_size}")
        if self.eval_max_size is not None and self.eval_size is None:
            problems.append("eval_max_size needs eval_size")
        if self.draw < 0 or self.explain < 0 or self.commit_seconds < 0:
            problems.append("draw, explain and commit_seconds must be >= 0")
        if problems:
            raise RaydetrError("invalid labelling options: " + "; ".join(problems))

    def for_model(self, default_threshold: float, transforms: "TransformsConfig | None" = None,
                  runtime: str = "torch", export_precision: str | None = None) -> "LabelOptions":
        """These options with the model's defaults where none was given, as the manifest records them: its
        score threshold (`detr.default_score_threshold`: lower for sigmoid-scored models), given its
        `transforms` the evaluation size the images are labelled at, its own `runtime`, and an export's
        precision (`export_precision`: the model is an export, whose precision is fixed)."""
        options = self if self.score_threshold is not None else dataclasses.replace(
            self, score_threshold=default_threshold)
        if options.runtime is None:
            options = dataclasses.replace(options, runtime=runtime)
        if export_precision is not None:
            if options.precision not in ("float32", export_precision):
                raise RaydetrError(f"the model is a {export_precision} export; precision {options.precision} is not "
                                   "its own")
            options = dataclasses.replace(options, precision=export_precision)
        elif options.precision not in PRECISIONS:
            raise RaydetrError(f"precision {options.precision} needs an {options.precision} export "
                               f"(detr export --precision {options.precision}) as the model")
        if transforms is not None:
            sized = options.transforms(transforms)
            options = dataclasses.replace(options, eval_size=sized.eval_size, eval_max_size=sized.eval_max_size)
        return options

    def transforms(self, model_transforms: "TransformsConfig") -> "TransformsConfig":
        """The model's evaluation transform at this run's evaluation size."""
        if self.eval_size is None:
            return model_transforms
        return model_transforms.at_eval_size(self.eval_size, self.eval_max_size)

    @property
    def torch_threads(self) -> int:
        return max(1, int(self.cpus_per_actor))

    def row_settings(self) -> dict:
        """The settings that shape the rows (recorded in the manifest, checked on re-runs); the panoptic
        threshold only for the panoptic task (it changes nothing in detection rows)."""
        names = ("task", "score_threshold", "top_k", "classes", "precision", "runtime", "eval_size",
                 "eval_max_size") + (
            ("panoptic_threshold",) if self.task == "panoptic" else ())
        settings = asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items() if k in names}


def parse_classes(spec: str | None, categories: Sequence[dict] | None) -> tuple[int, ...] | None:
    """`--classes person,car,3`: category names (case-insensitive) or ids -> sorted unique ids.

    Raises ValueError naming anything the model does not know.
    """
    if spec is None or not spec.strip():
        return None
    by_name = {str(c["name"]).lower(): int(c["id"]) for c in categories or []}
    known_ids = {int(c["id"]) for c in categories or []}
    ids, unknown = set(), []
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            continue
        if token.lstrip("-").isdigit() and (not known_ids or int(token) in known_ids):
            ids.add(int(token))
        elif token.lower() in by_name:
            ids.add(by_name[token.lower()])
        else:
            unknown.append(token)
    if unknown:
        names = ", ".join(sorted(by_name)[:20]) + (" ..." if len(by_name) > 20 else "")
        raise RaydetrError(f"--classes: the model has no class {', '.join(map(repr, unknown))}"
                         + (f" (it knows: {names})" if names else " (it has no class names: use ids)"))
    return tuple(sorted(ids)) or None
