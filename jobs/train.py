"""Train DETR on a Ray cluster with Ray Train, tracked in MLflow.

    detr train --config train.yaml [--set schedule.epochs=50 --set scaling.num_workers=4 ...]
    python -m jobs.train --config train.yaml        # the same, as a Ray job entry point

The driver checks the MLflow store (a store that is down fails the job at once),
builds the streaming train/val datasets with the data pipeline, resolves
`init_from` weights (official DETR checkpoint, raydetr checkpoint or MLflow
model), starts a `TorchTrainer` (DDP over gloo on CPU, NCCL on GPU), and when
training ends logs the best checkpoint as an MLflow pyfunc model (registered as
a new version when `tracking.registered_model` is set) with images of its
detections. Re-running with the same `storage.path` and `storage.run_name`
resumes from the latest checkpoint and continues the same MLflow run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any

from detr.errors import RaydetrError
from jobs.cli import module_main
from jobs.ray_session import connect, restore_working_directory
from jobs.train_progress import validated


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML or TOML job config (see jobs/train_config.py)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set schedule.epochs=10 (repeatable)")
    parser.add_argument("--init-from", help="start from these weights: official or raydetr checkpoint, "
                        "or an MLflow model URI (models:/name@alias, runs:/id/model)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")
    parser.add_argument("--verbose", action="store_true",
                        help="also print Ray's and the workers' own output (by default they stay in the cluster's "
                             "logs and the job prints a progress line per log_every_steps steps and per epoch)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the whole resolved config (defaults < recipe < file < --set) and exit")


def resolved_config_text(config) -> str:
    """Every key of a training config and its value, the model's included, as YAML."""
    import yaml

    from jobs.config_files import to_plain

    plain = to_plain(config.resolved())
    model = config.model_config().to_dict()
    note = ""
    if "num_classes" not in config.model:
        model.pop("num_classes")
        note = "# model.num_classes: the data's largest category id + 1 (set it to fix it)\n"
    return note + yaml.safe_dump({**plain, "model": {"preset": config.model.get("preset", "detr_r50"), **model}},
                                 sort_keys=False)


@dataclass
class TrainResult:
    run_id: str
    tracking_uri: str
    checkpoint_dir: str
    metrics: dict[str, Any]
    model_uri: str | None
    registered_version: str | None
    storage_path: str


def _run_name(config) -> str:
    return config.storage.run_name or f"detr-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def _mlflow_run(config, tracking_uri: str, run_dir: str):
    """Continue the run recorded in the storage folder (a resumed job), or start one."""
    from jobs.tracking import TrackedRun
    from pipelines import storage

    marker = storage.join(run_dir, "mlflow_run.json")
    if storage.exists(marker):
        recorded = json.loads(storage.read_text(marker))
        if recorded.get("tracking_uri") == tracking_uri:
            run = TrackedRun(tracking_uri, recorded["run_id"])
            run.resume()
            return run, True
    run = TrackedRun.start(tracking_uri, config.tracking.experiment, config.tracking.run_name or os.path.basename(run_dir),
                           tags={"raydetr.job": "train"})
    storage.write_bytes_atomic(marker, json.dumps({"run_id": run.run_id, "tracking_uri": tracking_uri}).encode())
    return run, False


def _init_state(spec: str | None, tracking_uri: str) -> dict | None:
    """The weights to start from, as saved (the workers fit them to their model: `detr.weights`), loaded the
    one way every job loads a model (`Detector.from_checkpoint`)."""
    if not spec:
        return None
    from jobs.model_sources import load_detector

    return load_detector(spec, tracking_uri)[1].model.state_dict()


DATA_PIPELINE_CPUS = 1
"""What the data pipeline needs beside the training workers: without a CPU of its own it never runs."""


def ray_cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 0))


def training_cpus(scaling) -> float:
    """The CPUs a training layout needs: its workers', and one for the data pipeline."""
    return scaling.num_workers * scaling.cpus_per_worker + DATA_PIPELINE_CPUS


def check_training_fits(scaling, cluster_cpus: float) -> None:
    """Refuse at once a layout whose workers would take every CPU: Ray Data would wait forever for one."""
    needed = training_cpus(scaling)
    if needed > cluster_cpus:
        most = max(0, int((cluster_cpus - DATA_PIPELINE_CPUS) // scaling.cpus_per_worker))
        raise RaydetrError(
            f"{scaling.num_workers} training workers x {scaling.cpus_per_worker} CPUs, plus {DATA_PIPELINE_CPUS} for "
            f"the data pipeline, need {needed:g} CPUs; the cluster has {cluster_cpus:g}. Set scaling.num_workers to "
            f"at most {most} (or lower scaling.cpus_per_worker), or add nodes")


def _use_gpu(config) -> bool:
    import ray

    if config.scaling.use_gpu is not None:
        return config.scaling.use_gpu
    return ray.cluster_resources().get("GPU", 0) >= 1


def score_metric(model_config) -> str:
    """What ranks checkpoints: validation PQ for a model with masks, box AP otherwise."""
    return "val_PQ" if model_config.masks else "val_AP"


def _best_checkpoint(result, score: str = "val_AP"):
    """The checkpoint with the best validation score, else the latest."""
    best = [(ckpt, m) for ckpt, m in (result.best_checkpoints or []) if validated(m.get(score))]
    if best:
        return max(best, key=lambda cm: cm[1][score])
    return result.checkpoint, result.metrics or {}


def _log_detection_images(run, detector_checkpoint: str, val_source: str | None, val_images: str | None,
                          count: int, directory: str) -> None:
    """PNG previews of the final model's detections on the first validation images."""
    if not val_source or count <= 0:
        return
    from pipelines.inference.detector import Detector
    from pipelines.inference.drawing import draw_detections
    from pipelines.sources import iter_records, open_source
    from pipelines.validation.loading import first_images

    detector = Detector.from_checkpoint(detector_checkpoint)
    for written, (_, decoded) in enumerate(first_images(iter_records(open_source(val_source, images=val_images)),
                                                        count)):
        detections = detector.detect([decoded.array])[0]
        path = os.path.join(directory, f"detections_{written:02d}.png")
        draw_detections(decoded.array, detections, detector.label_name).save(path)
        run.log_artifact(path, "detections")


def train(config, *, address: str | None = None, pid_dir: str | None = None, verbose: bool = False) -> TrainResult:
    """Run a training job end to end; returns where everything went. Unless `verbose`, Ray's and the
    workers' output stays in the cluster's logs and the job prints its own progress lines."""
    from jobs.tracking import ensure_tracking_available, resolve_tracking_uri
    from pipelines.sources import open_source
    from pipelines.storage import check_reachable

    config = config.resolved()
    # Inputs first: a missing file is one line at once, before Ray Train is imported or Ray, a tracking
    # database or a model are started.
    outside = config.data.allow_outside_paths
    train_source = open_source(config.data.train, images=config.data.train_images, allow_outside_paths=outside)
    val_source = open_source(config.data.val, images=config.data.val_images,
                             allow_outside_paths=outside) if config.data.val else None
    if config.init_from:
        from jobs.model_sources import check_model_spec

        check_model_spec(config.init_from)
    check_reachable(config.storage.path)
    tracking_uri = resolve_tracking_uri(config.tracking.uri)
    ensure_tracking_available(tracking_uri)
    finished = finished_run(config)
    if finished is not None:  # re-running a finished run: nothing to resume, nothing to register again
        print(f"run {config.storage.run_name} finished already ({finished.model_uri}, MLflow run {finished.run_id}): "
              "nothing to do. Train anew under another storage.run_name, or raise schedule.epochs to go on",
              flush=True)
        return finished

    import yaml
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from detr.training_checkpoint import MODEL_FILE
    from jobs.config_files import flatten, to_plain
    from jobs.mlflow_model import log_detector_model
    from jobs.train_loop import train_loop_per_worker
    from jobs.train_progress import ProgressQueue
    from pipelines import storage
    from pipelines.inference.detector import transforms_to_metadata
    from pipelines.placement import nodes_that_cannot_see
    from pipelines.training.dataset import build_detection_dataset
    from pipelines.training.transforms import TransformsConfig

    connect(address, num_cpus=training_cpus(config.scaling), quiet=not verbose)  # enough logical CPUs for it
    check_training_fits(config.scaling, ray_cluster_cpus())
    blind = nodes_that_cannot_see(config.storage.path)
    if blind:
        raise RaydetrError(f"storage.path {config.storage.path} is a folder that {len(blind)} of the cluster's nodes "
                         f"cannot see ({', '.join(blind)}): checkpoints written there would be lost. Use an object "
                         "store (s3://..., gs://...) or a file system mounted at the same path on every node")

    transforms = TransformsConfig.preset(config.data.transforms)
    window = config.data.batch_size * 8 if config.data.aspect_ratio_grouping else 0
    train_data = build_detection_dataset(train_source, train=True, transforms=transforms, seed=config.schedule.seed,
                                         group_aspect_ratio_window=window)
    datasets = {"train": train_data.dataset}
    val_data = None
    if config.data.val:
        val_data = build_detection_dataset(val_source, train=False, transforms=transforms, seed=config.schedule.seed)
        datasets["val"] = val_data.dataset
    categories = train_data.categories or []
    num_classes = max((int(c["id"]) for c in categories), default=0) + 1
    model_config = config.model_config(num_classes=max(num_classes, 2))
    init_state = _init_state(config.init_from, tracking_uri)
    if init_state is not None:
        # Checked here, once: in the workers a misfit would fail every attempt Ray Train makes.
        from detr import build_model
        from detr.weights import load_weights

        load_weights(build_model(model_config), init_state, f"init_from {config.init_from}")

    run_name = _run_name(config)
    run_dir = storage.join(config.storage.path, run_name)
    run, resumed = _mlflow_run(config, tracking_uri, run_dir)
    print(f"MLflow run {run.run_id} ({'resumed' if resumed else 'new'}) at {tracking_uri}", flush=True)
    plain = to_plain(config)
    run.log_params({**{f"job.{k}": v for k, v in flatten(plain).items()},
                    **{f"model.{k}": v for k, v in flatten(model_config.to_dict()).items()}})
    with tempfile.TemporaryDirectory() as tmp:
        config_path = os.path.join(tmp, "train_config.yaml")
        with open(config_path, "w") as f:
            yaml.safe_dump({**plain, "model": {**plain["model"], **model_config.to_dict()}}, f, sort_keys=False)
        run.log_artifact(config_path)

    metadata = {
        "categories": [dict(c) for c in categories],
        "transforms": transforms_to_metadata(transforms),
        "train_source": config.data.train,
        "mlflow_run_id": run.run_id,
    }
    loop_config = {
        "job": plain,
        "model_config": model_config.to_dict(),
        "metadata": metadata,
        "tracking_uri": tracking_uri,
        "run_id": run.run_id,
        "init_state": init_state,
        "pid_dir": pid_dir,
        "epoch_clock": train_data.clock,  # each epoch's augmentation seed, set by the workers
        "progress": ProgressQueue(),
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=config.scaling.num_workers, use_gpu=_use_gpu(config),
                                     resources_per_worker={"CPU": config.scaling.cpus_per_worker},
                                     placement_strategy=config.scaling.placement_strategy),
        run_config=RunConfig(
            name=run_name,
            storage_path=config.storage.path,
            failure_config=FailureConfig(max_failures=config.storage.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.storage.keep_checkpoints,
                                               checkpoint_score_attribute=score_metric(model_config),
                                               checkpoint_score_order="max"),
            # Plain prints in workers (pycocotools' summary is silenced with redirect_stdout).
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split="all"),
    )
    try:
        with loop_config["progress"].printing():
            result = trainer.fit()
    except BaseException:
        run.finish("FAILED")
        raise

    restore_working_directory()
    checkpoint, best_metrics = _best_checkpoint(result, score_metric(model_config))
    errors = (train_data.errors.errors() if train_data.errors else []) + (
        val_data.errors.errors() if val_data and val_data.errors else [])
    with tempfile.TemporaryDirectory() as tmp:
        local = checkpoint.to_directory(os.path.join(tmp, "best"))
        model_path = os.path.join(local, MODEL_FILE)
        if errors:
            from pipelines.validation.errors import write_errors_table

            table = write_errors_table(errors, storage.join(run_dir, "errors.parquet"))
            run.log_artifact(write_errors_table(errors, os.path.join(tmp, "errors.parquet")), "data")
            print(f"{len(errors)} bad records quarantined in {table}", flush=True)
        tags = {"raydetr.train_run_id": run.run_id, "raydetr.train_source": config.data.train,
                **{f"raydetr.{k}": v for k, v in best_metrics.items() if k.startswith("val_") and validated(v)}}
        info = log_detector_model(tracking_uri, run.run_id, model_path,
                                  registered_model_name=config.tracking.registered_model, tags=tags,
                                  exports=config.tracking.exports)
        _log_detection_images(run, model_path, config.data.val, config.data.val_images,
                              config.schedule.log_images, tmp)
    run.finish()
    version = getattr(info, "registered_model_version", None)
    name = config.tracking.registered_model
    result = TrainResult(run.run_id, tracking_uri, checkpoint.path, dict(best_metrics),
                         f"models:/{name}/{version}" if version is not None else info.model_uri,
                         str(version) if version is not None else None, run_dir)
    storage.write_bytes_atomic(storage.join(run_dir, FINISHED_FILE), json.dumps(
        {"epochs": config.schedule.epochs, **dataclasses.asdict(result)}, default=float).encode())
    return result


FINISHED_FILE = "finished.json"
"""Written into the run's folder when it ends: a re-run of the same run finds it and does nothing."""


def finished_run(config) -> TrainResult | None:
    """The result of the run `config` names if it finished with at least `schedule.epochs` epochs asked."""
    from pipelines import storage

    if not config.storage.run_name:
        return None
    marker = storage.join(config.storage.path, config.storage.run_name, FINISHED_FILE)
    if not storage.exists(marker):
        return None
    recorded = json.loads(storage.read_bytes(marker))
    if recorded.pop("epochs") < config.schedule.epochs:
        return None
    return TrainResult(**recorded)


def run(args: argparse.Namespace) -> int:
    from jobs.train_config import load_train_config

    config = load_train_config(args.config, args.overrides, require_train=not args.print_config)
    if args.init_from:
        config = dataclasses.replace(config, init_from=args.init_from)
    if args.print_config:
        print(resolved_config_text(config), end="")
        return 0
    result = train(config, address=args.address, verbose=args.verbose)
    ap = result.metrics.get("val_AP")
    print(f"training finished: MLflow run {result.run_id}; best checkpoint {result.checkpoint_dir}")
    if validated(ap):
        print(f"validation AP {ap:.4f}, AP50 {result.metrics.get('val_AP50', float('nan')):.4f}")
    pq = result.metrics.get("val_PQ")
    if validated(pq):
        print(f"validation PQ {pq:.4f} (things {result.metrics.get('val_PQ_th', float('nan')):.4f}, "
              f"stuff {result.metrics.get('val_PQ_st', float('nan')):.4f})")
    print(f"model: {result.model_uri}")
    if result.tracking_uri.startswith(("http://", "https://")):
        print(f"see it: {result.tracking_uri.rstrip('/')}/#/runs/{result.run_id}")
    else:
        print(f"see it: mlflow ui --backend-store-uri {result.tracking_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(module_main(sys.modules[__name__]))
