"""The training job's configuration: one file describes data, model, optimiser, schedule,
scaling, storage and tracking. Every value has its single default here (or, for the model
and optimiser, in `detr.DETRConfig` and `detr.optim.OptimizerConfig`).

Example (YAML; TOML works the same way):

    recipe: fast                          # optional: jobs.recipes fills in what the file leaves out
    data:
      train: data/shapes/train.json      # any source the pipelines read
      val: data/shapes/val.json
      transforms: small                   # transforms preset: paper | small
      batch_size: 4                       # per worker
    model:
      preset: tiny                        # a DETRConfig preset, then any DETRConfig field
      num_queries: 20                     # num_classes defaults to the data's largest category id + 1
    optimizer: {lr: 1.0e-4, lr_backbone: 1.0e-5, lr_drop_epoch: 200}
    schedule: {epochs: 300, eval_every: 1}
    scaling: {num_workers: 2}
    storage: {path: /shared/ray_results, run_name: shapes-r18}
    tracking: {experiment: shapes, registered_model: shapes-detector}
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from detr.config import DETRConfig
from detr.errors import RaydetrError
from detr.optim import OptimizerConfig
from jobs.config_files import ConfigError, apply_overrides, build_dataclass, read_config_file, unknown_key_error
from jobs.recipes import apply_recipe


@dataclass(frozen=True)
class DataSection:
    train: str = ""
    """Training source: COCO JSON, YOLO or VOC folder, Parquet from `detr ingest`, ... (required)."""
    train_images: str | None = None
    """Image folder of a COCO JSON when it is not the JSON's own folder."""
    val: str | None = None
    val_images: str | None = None
    transforms: str = "paper"
    """Augmentation preset of `pipelines.training.transforms.TransformsConfig`: paper | small | native."""
    batch_size: int = 4
    """Images per worker per step (the paper: 4 per GPU)."""
    eval_batch_size: int = 4
    aspect_ratio_grouping: bool = True
    """Sort windows of samples by aspect ratio so batches carry less padding."""
    allow_outside_paths: bool = False
    """Read images an annotation file names outside its folder (absolute or '..' paths), or links out of a
    local folder; refused as `unsafe_path` by default."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise RaydetrError("batch sizes must be >= 1")


@dataclass(frozen=True)
class ScheduleSection:
    epochs: int = 300
    eval_every: int = 1
    """Validate (COCO AP on data.val) every N epochs, and after the last."""
    grad_accum_steps: int = 1
    max_steps_per_epoch: int | None = None
    """Cap on optimiser steps per epoch (quick runs, smoke tests); None: the whole shard."""
    bf16: bool = False
    """bf16 autocast on GPU workers (ignored on CPU)."""
    seed: int = 42
    log_every_steps: int = 10
    """Training-loss metrics are averaged over this many steps before they are logged."""
    log_images: int = 4
    """Validation images with drawn detections logged as MLflow artifacts at the end."""
    time_budget_minutes: float | None = None
    """Stop after the first epoch that ends past this many minutes of training (then validate)."""

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.eval_every < 1 or self.grad_accum_steps < 1 or self.log_every_steps < 1:
            raise RaydetrError("epochs, eval_every, grad_accum_steps and log_every_steps must be >= 1")


@dataclass(frozen=True)
class ScalingSection:
    num_workers: int = 1
    use_gpu: bool | None = None
    """None: use one GPU per worker when the cluster has GPUs."""
    cpus_per_worker: int = 1
    torch_threads: int | None = None
    """Intra-op threads per worker; None: cpus_per_worker."""
    placement_strategy: str = "PACK"
    """How Ray places the workers: PACK (few nodes; Ray's default) or SPREAD (one per node where possible)."""

    def __post_init__(self) -> None:
        if self.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ConfigError(f"scaling.placement_strategy: {self.placement_strategy!r} is not one of PACK, SPREAD, "
                              "STRICT_PACK, STRICT_SPREAD")


@dataclass(frozen=True)
class StorageSection:
    path: str = "ray_results"
    """Local folder or shared URI (s3://, gs://, ...) for checkpoints; resolved to absolute when local."""
    run_name: str | None = None
    """Ray Train run name; re-running with the same name and path resumes from its latest checkpoint."""
    keep_checkpoints: int = 3
    """Checkpoints kept: the best by validation AP (the latest is always kept too)."""
    max_failures: int = 3
    """Worker-group restarts (from the latest checkpoint) before the job gives up."""


@dataclass(frozen=True)
class TrackingSection:
    uri: str | None = None
    """MLflow tracking URI; None: $MLFLOW_TRACKING_URI, else MLflow's default (sqlite:///mlflow.db)."""
    experiment: str = "raydetr"
    run_name: str | None = None
    registered_model: str | None = None
    """When set, the final model is registered as a new version of this registered model."""
    exports: tuple[str, ...] = ()
    """Export formats (`onnx`, `openvino`) logged with the model, checked against PyTorch: its pyfunc's
    `runtime` param then runs them instead of exporting on first use."""

    def __post_init__(self) -> None:
        unknown = [f for f in self.exports if f not in ("onnx", "openvino")]
        if unknown:
            raise ConfigError(f"tracking.exports: unknown format {', '.join(map(repr, unknown))}; choose onnx or "
                              "openvino")


@dataclass(frozen=True)
class TrainJobConfig:
    data: DataSection = field(default_factory=DataSection)
    model: dict[str, Any] = field(default_factory=lambda: {"preset": "detr_r50"})
    """`preset` (a DETRConfig preset name) plus any DETRConfig field to override."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    storage: StorageSection = field(default_factory=StorageSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    init_from: str | None = None
    """Start from weights: an official DETR checkpoint, one of ours, or an MLflow model URI
    (models:/name@alias, models:/name/3, runs:/RUN_ID/model). The class head is replaced when
    the class count differs."""
    freeze_backbone: bool = False
    recipe: str | None = None
    """A named recipe of `jobs.recipes` (paper | fast) whose values fill in what the file leaves out."""

    def __post_init__(self) -> None:
        self.model_config(num_classes=self.model.get("num_classes", 2))  # validate early

    def model_config(self, num_classes: int | None = None) -> DETRConfig:
        """The DETRConfig: the preset, the file's fields, then `num_classes` if the file leaves it out."""
        fields = dict(self.model)
        preset = fields.pop("preset", "detr_r50")
        known = {f.name for f in dataclasses.fields(DETRConfig)}
        for key in fields:
            if key not in known:
                raise unknown_key_error(DETRConfig, key, "model.", sorted(known | {"preset"}))
        if "num_classes" not in fields and num_classes is not None:
            fields["num_classes"] = num_classes
        if self.freeze_backbone:
            fields["train_backbone"] = False
        try:
            return DETRConfig.preset(preset, **fields)
        except ValueError as exc:
            raise ConfigError(f"model: {exc}") from exc

    def resolved(self) -> "TrainJobConfig":
        """Local storage paths made absolute (workers on other nodes and restarts must agree)."""
        path = self.storage.path
        if "://" not in path:
            path = os.path.abspath(path)
        return dataclasses.replace(self, storage=dataclasses.replace(self.storage, path=path))


def load_train_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = (),
                      require_train: bool = True) -> TrainJobConfig:
    """Read a config file (optional) and apply `--set` overrides."""
    data: Mapping[str, Any] = read_config_file(path) if path else {}
    data = apply_recipe(apply_overrides(dict(data), overrides))
    config = build_dataclass(TrainJobConfig, data)
    if require_train and not config.data.train:
        raise ConfigError("data.train is required: the training source (e.g. a COCO JSON)")
    return config
