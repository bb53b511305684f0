"""Evaluate a detector on a labelled dataset: COCO box metrics with pycocotools, logged to MLflow.

    detr evaluate --model models:/shapes@champion --data data/val.json
    python -m jobs.evaluate --model run/model.pt --data s3://bucket/coco/val.json --concurrency 4
    detr evaluate --task panoptic --model models:/shapes-panoptic@champion --data data/panoptic_val.json

`--task panoptic` evaluates a model with masks on a COCO panoptic dataset: PQ, SQ
and RQ overall, for things and for stuff, and per class (torchmetrics'
PanopticQuality, at each image's original size against its PNG), and mask AP of
the things (pycocotools, iouType "segm"); logged the same way, with a per-class
table of PQ/SQ/RQ and mask AP.

Inference is distributed with Ray Data (`pipelines.evaluation`): model actors
(one model load each) consume evaluation batches that the data pipeline decodes,
validates and resizes with the model's own evaluation transform. The twelve standard COCO numbers and
per-class AP go to an MLflow run of their own, tagged with the model (name,
version, run) and the dataset's content digest, with a per-class table and a
precision-recall plot as artifacts. An evaluation of the same registered model
version on data with the same digest (and at the same evaluation size) is reused instead of recomputed
(unless `--force`). `--eval-size` evaluates at another shorter side than the model's own (the
speed/accuracy trade); the size is a param and tag of the run. `--runtime onnxruntime|openvino` evaluates
the model's ONNX export in that runtime (what a CPU fleet labelling with `detr label --runtime` gets); the
runtime is a param and tag of the run, and an evaluation in one runtime is never reused for another.
MODEL may also be a `detr export` folder (float32 or int8, run in its own runtime unless `--runtime` names
the other): its precision is a param and tag too, the version it was exported from is tagged with its
headline number (`raydetr.eval.DIGEST.onnxruntime.int8.AP`), and an export's evaluation is never reused
(another export of the same version may be calibrated differently).

A detection evaluation also draws the paper's analyses (`pipelines.evaluation.analysis_report`; skipped with
`--no-analysis`): AP and AP50 after each decoder layer with and without NMS, the boxes each query slot
predicts, instances missed against instances per image, a confusion matrix and the images with the most
errors, each PNG with the numbers behind it, logged to the run under `analysis/` and, with `--plots DIR`,
written to DIR too.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field

from detr.config import PANOPTIC_THRESHOLD
from detr.errors import RaydetrError
from jobs.cli import add_eval_size_arguments, module_main
from jobs.ray_session import connect
from pipelines.labelling.options import RUNTIMES

EVAL_EXPERIMENT = "raydetr-evaluations"
TAG_JOB = "raydetr.job"
TAG_DIGEST = "raydetr.dataset_digest"
TAG_MODEL_NAME = "raydetr.model_name"
TAG_MODEL_VERSION = "raydetr.model_version"
TAG_MODEL_URI = "raydetr.model_uri"
TAG_TASK = "raydetr.task"
TAG_EVAL_SIZE = "raydetr.eval_size"
"""Shorter x longer side images were evaluated at, e.g. "800x1333"; runs from before it are at the model's own."""
TAG_RUNTIME = "raydetr.runtime"
"""Where the model ran (pipelines.inference.runtimes.RUNTIMES); runs without it ran in PyTorch."""
TAG_PRECISION = "raydetr.precision"
"""An export's precision ("float32" or "int8"); runs without it ran the model in float32."""
TASKS = ("detection", "panoptic")
HEADLINE = {"detection": "AP", "panoptic": "PQ"}
"""The number each evaluation task tags the model version with."""


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint file, official DETR file, MLflow model URI, or "
                                                       "a detr export folder")
    parser.add_argument("--data", required=True, help="labelled source: COCO JSON, YOLO/VOC folder, Parquet")
    parser.add_argument("--images", help="image folder of a COCO JSON when it is not the JSON's folder")
    parser.add_argument("--batch-size", type=int, default=4)
    add_eval_size_arguments(parser)
    parser.add_argument("--concurrency", type=int, default=1, help="model actors (each loads the model once)")
    parser.add_argument("--runtime", choices=RUNTIMES, default=None,
                        help="where the model runs: PyTorch, or its ONNX export in ONNX Runtime or OpenVINO "
                             "(the raydetr[onnx] / raydetr[openvino] extras; default: torch for a checkpoint, an "
                             "export folder's own runtime)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    parser.add_argument("--experiment", default=EVAL_EXPERIMENT)
    parser.add_argument("--no-mlflow", action="store_true", help="print the metrics without logging them")
    parser.add_argument("--force", action="store_true", help="recompute even if a matching evaluation exists")
    parser.add_argument("--allow-outside-paths", action="store_true",
                        help="read images named outside their folder (absolute or '..' paths in an annotation file, links out "
                             "of a local folder); refused as unsafe_path by default")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or local)")
    parser.add_argument("--task", choices=TASKS, default="detection",
                        help="detection: box AP; panoptic: PQ/SQ/RQ and mask AP (a model with masks, COCO panoptic data)")
    parser.add_argument("--plots", help="also write the analyses' PNGs and numbers to this local folder")
    parser.add_argument("--no-analysis", action="store_true",
                        help="detection: skip the analyses (per-layer AP, slots, confusion matrix, worst images)")
    parser.add_argument("--panoptic-threshold", type=float, default=PANOPTIC_THRESHOLD,
                        help="panoptic: keep queries whose top probability exceeds this (the paper's 0.85)")


@dataclass
class EvalResult:
    metrics: dict[str, float]
    per_class: dict[int, dict[str, float]]
    """Category id -> its numbers (`AP`; panoptic: `PQ`, `SQ`, `RQ`, `TP`, `FP`, `FN`, `mask_AP`)."""
    digest: str
    images: int
    run_id: str | None = None
    reused: bool = False
    categories: list[dict] = field(default_factory=list)
    task: str = "detection"
    eval_size: str = ""
    """Shorter x longer side the images were resized to ("800x1333")."""
    own_size: bool = True
    """Whether that is the model's own evaluation size."""
    runtime: str = "torch"
    precision: str = "float32"
    """An export's precision; a checkpoint evaluates in float32."""
    analysis: dict = field(default_factory=dict)
    """The analyses: "files" (name -> file name, in the run's analysis/ and in "folder" when --plots) and
    "skipped" (name -> why it was not drawn)."""


def size_text(transforms) -> str:
    return f"{transforms.eval_size}x{transforms.eval_max_size}"


def find_evaluation(tracking_uri: str, model_name: str, version: str, digest: str, task: str = "detection",
                    eval_size: str = "", own_size: str = "", runtime: str = "torch"):
    """The latest finished evaluation run of this model version on data with this digest at this evaluation
    size (runs without a size were at the model's own, `own_size`) in this runtime, or None."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return None
    query = (f"tags.`{TAG_JOB}` = 'evaluate' and tags.`{TAG_MODEL_NAME}` = '{model_name}' and "
             f"tags.`{TAG_MODEL_VERSION}` = '{version}' and tags.`{TAG_DIGEST}` = '{digest}' and "
             "attributes.status = 'FINISHED'")
    if task != "detection":
        query += f" and tags.`{TAG_TASK}` = '{task}'"
    runs = client.search_runs(experiments, query, order_by=["attributes.start_time DESC"], max_results=20)
    # Runs from before tasks existed carry no task tag: they are detection evaluations.
    runs = [r for r in runs if r.data.tags.get(TAG_TASK, "detection") == task
            and r.data.tags.get(TAG_EVAL_SIZE, own_size) == eval_size
            and r.data.tags.get(TAG_RUNTIME, "torch") == runtime]
    return runs[0] if runs else None


def _log_evaluation(tracking_uri: str, experiment: str, model, data: str, result: EvalResult, scores,
                    analysis_files: list[str] = ()) -> str:
    """One MLflow run per evaluation (metrics, per-class metrics, table, plot), and the headline number as a
    tag on the registered model version."""
    from jobs.tracking import TrackedRun
    from pipelines.evaluation.report import (DETECTION_COLUMNS, PANOPTIC_COLUMNS, plot_precision_recall,
                                             write_per_class_table)

    panoptic = result.task == "panoptic"
    tags = {TAG_JOB: "evaluate", TAG_DIGEST: result.digest, TAG_MODEL_URI: model.uri, TAG_MODEL_NAME: model.name,
            TAG_MODEL_VERSION: model.version, "raydetr.model_run_id": model.run_id, "raydetr.data_source": data,
            TAG_EVAL_SIZE: result.eval_size, TAG_RUNTIME: result.runtime, TAG_PRECISION: result.precision}
    if panoptic:
        tags[TAG_TASK] = "panoptic"
    prefix = "panoptic-eval" if panoptic else "eval"
    run = TrackedRun.start(tracking_uri, experiment, f"{prefix}-{model.name}-v{model.version or 'file'}", tags=tags)
    run.log_params({"model": model.uri, "data": data, "dataset_digest": result.digest, "images": result.images,
                    "eval_size": result.eval_size, "runtime": result.runtime, "precision": result.precision,
                    **({"task": "panoptic"} if panoptic else {})})
    headline = HEADLINE[result.task]
    names = {int(c["id"]): str(c["name"]) for c in result.categories}
    per_class = {f"{headline}_class/{names.get(k, k)}": v[headline] for k, v in result.per_class.items()}
    run.log_metrics({k: v for k, v in {**result.metrics, **per_class}.items() if not math.isnan(v)}, step=0)
    with tempfile.TemporaryDirectory() as tmp:
        columns = PANOPTIC_COLUMNS if panoptic else DETECTION_COLUMNS
        run.log_artifact(write_per_class_table(os.path.join(tmp, f"per_class_{headline.lower()}.csv"),
                                               result.per_class, result.categories, columns))
        if not panoptic:
            run.log_artifact(plot_precision_recall(scores.pr_curves, result.categories,
                                                   os.path.join(tmp, "precision_recall.png")))
    for path in analysis_files:
        run.log_artifact(path, "analysis")
    run.finish()
    if model.version:
        from mlflow.tracking import MlflowClient

        size = "" if result.own_size else f"{result.eval_size}."
        runtime = "" if result.runtime == "torch" else f"{result.runtime}."
        runtime += "" if result.precision == "float32" else f"{result.precision}."
        MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri).set_model_version_tag(
            model.name, model.version, f"raydetr.eval.{result.digest[:12]}.{size}{runtime}{headline}",
            f"{result.metrics[headline]:.6f}")
    return run.run_id


def evaluate(
    model_spec: str,
    data: str,
    *,
    images: str | None = None,
    batch_size: int = 4,
    concurrency: int = 1,
    tracking_uri: str | None = None,
    experiment: str = EVAL_EXPERIMENT,
    log_to_mlflow: bool = True,
    reuse: bool = True,
    address: str | None = None,
    task: str = "detection",
    panoptic_threshold: float = PANOPTIC_THRESHOLD,
    allow_outside_paths: bool = False,
    eval_size: int | None = None,
    eval_max_size: int | None = None,
    runtime: str | None = None,
    analysis: bool = True,
    plots: str | None = None,
) -> EvalResult:
    """Evaluate `model_spec` on `data`; returns the metrics (and the MLflow run id when logged)."""
    if task not in TASKS:
        raise RaydetrError(f"unknown task {task!r}; choose from {TASKS}")
    if eval_max_size is not None and eval_size is None:
        raise RaydetrError("--eval-max-size needs --eval-size")
    from jobs.model_sources import check_model_spec
    from pipelines.inference.runtimes import check_model_runs_in, check_runtime
    from pipelines.sources import open_source

    if runtime is not None:
        check_runtime(runtime)  # not installed: one line, before anything starts
    # inputs first: a missing file is one line, before tracking or Ray start
    check_model_spec(model_spec, allow_export=True)
    source = open_source(data, images=images, allow_outside_paths=allow_outside_paths)

    import ray

    from detr.evaluation import STAT_NAMES
    from detr.panoptic_evaluation import PANOPTIC_STAT_NAMES
    from jobs.model_sources import load_detector
    from jobs.tracking import ensure_tracking_available, resolve_tracking_uri
    from pipelines.evaluation.detection import score_detection
    from pipelines.evaluation.panoptic import score_panoptic
    from pipelines.tools.digest import dataset_digest
    from pipelines.training.dataset import build_detection_dataset

    uri = resolve_tracking_uri(tracking_uri)
    if log_to_mlflow:
        ensure_tracking_available(uri)
    loaded, detector = load_detector(model_spec, uri, allow_export=True)
    if task == "panoptic" and not loaded.masks:
        raise RaydetrError(f"--task panoptic needs a model with masks; {model_spec} has none (DETRConfig.masks)")
    runtime = runtime or loaded.runtime
    check_runtime(runtime)
    check_model_runs_in(runtime, detector.config)
    model = loaded.resolved
    transforms = loaded.transforms if eval_size is None else loaded.transforms.at_eval_size(eval_size, eval_max_size)
    sized = {"eval_size": size_text(transforms), "own_size": transforms == loaded.transforms, "runtime": runtime,
             "precision": loaded.precision}
    connect(address)
    digest = dataset_digest(source)
    if task == "panoptic" and not source.is_panoptic:
        raise RaydetrError(f"{data}: --task panoptic needs a COCO panoptic dataset (a JSON with segments_info)")
    if not digest.images:
        raise RaydetrError(f"{data}: the evaluation set holds no image")
    if reuse and log_to_mlflow and model.version and loaded.export is None and not plots:  # --plots: drawn anew
        previous = find_evaluation(uri, model.name, model.version, digest.digest, task, sized["eval_size"],
                                   size_text(loaded.transforms), runtime)
        if previous is not None:
            names = STAT_NAMES if task == "detection" else PANOPTIC_STAT_NAMES
            metrics = {k: previous.data.metrics[k] for k in names if k in previous.data.metrics}
            return EvalResult(metrics, {}, digest.digest, digest.images, previous.info.run_id, reused=True,
                              categories=source.categories or [], task=task, **sized)

    # Actors on any node load the model from the object store (an exported runtime's graph: exported once, here).
    checkpoint = ray.put(loaded.payload(runtime, detector))
    dataset = build_detection_dataset(source, train=False, transforms=transforms, seed=0, shuffle=False)
    options = {"batch_size": batch_size, "concurrency": concurrency, "runtime": runtime}
    if task == "panoptic":
        scores = score_panoptic(dataset, source, checkpoint, panoptic_threshold, **options)
        categories = source.categories or []
    else:
        categories = source.categories or loaded.categories or []
        wanted = analysis and (log_to_mlflow or bool(plots))  # drawn only where they are kept
        scores = score_detection(dataset, checkpoint, categories, analysis=wanted, **options)
    if scores.rejected:
        print(scores.rejected, flush=True)
    if not scores.images:
        raise RaydetrError(f"{data}: no image could be evaluated"
                           + (f" ({scores.rejected})" if scores.rejected else ""))
    result = EvalResult(scores.metrics, scores.per_class, digest.digest, scores.images,
                        categories=list(categories), task=task, **sized)
    with tempfile.TemporaryDirectory(prefix="raydetr-analysis-") as tmp:
        files = []
        if scores.analysis is not None:
            from detr.postprocess import default_score_threshold
            from pipelines.evaluation.analysis_report import write_analysis_report

            report = write_analysis_report(scores.analysis, list(categories), source, plots or tmp,
                                           default_score_threshold(detector.config),
                                           learned_slots=detector.config.two_stage is None,
                                           refined_boxes=detector.config.roi_refine is not None)
            files = list(report.files.values())
            result.analysis = {"files": {name: os.path.basename(path) for name, path in report.files.items()},
                               "skipped": report.skipped, "folder": plots}
        if log_to_mlflow:
            result.run_id = _log_evaluation(uri, experiment, model, data, result, scores, files)
    return result


def format_result(result: EvalResult) -> str:
    names = {int(c["id"]): str(c["name"]) for c in result.categories}
    runtime = "" if result.runtime == "torch" else f", in {result.runtime}"
    runtime += "" if result.precision == "float32" else f" ({result.precision})"
    lines = [f"dataset digest {result.digest} ({result.images} images at {result.eval_size}{runtime})"
             + (f"; reused evaluation run {result.run_id}" if result.reused else "")]
    lines += [f"  {name:<10} {value:7.4f}" for name, value in result.metrics.items()]
    if result.per_class and result.task == "panoptic":
        lines.append("  per class:       PQ      SQ      RQ  mask AP")
        for k, v in sorted(result.per_class.items()):
            lines.append(f"    {names.get(k, str(k)):<10} {v['PQ']:7.4f} {v['SQ']:7.4f} {v['RQ']:7.4f} {v['mask_AP']:7.4f}")
    elif result.per_class:
        lines.append("  per-class AP:")
        lines += [f"    {names.get(k, str(k)):<20} {v['AP']:7.4f}" for k, v in sorted(result.per_class.items())]
    if result.analysis:
        where = ["the run's analysis/"] if result.run_id else []
        where += [result.analysis["folder"]] if result.analysis.get("folder") else []
        lines.append(f"analysis: {', '.join(sorted(result.analysis['files'].values()))}"
                     + (f" ({' and '.join(where)})" if where else ""))
        lines += [f"  not drawn: {name}: {why}" for name, why in result.analysis["skipped"].items()]
    if result.run_id and not result.reused:
        lines.append(f"MLflow run {result.run_id}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from jobs.model_sources import check_model_spec
    from jobs.tracking import resolve_tracking_uri

    check_model_spec(args.model, allow_export=True)  # a missing file is the one line printed
    if not args.no_mlflow or args.model.startswith(("models:/", "runs:/")):
        print(f"MLflow: {resolve_tracking_uri(args.tracking_uri)}", flush=True)  # which store, said first
    result = evaluate(args.model, args.data, images=args.images, batch_size=args.batch_size,
                      concurrency=args.concurrency, tracking_uri=args.tracking_uri, experiment=args.experiment,
                      log_to_mlflow=not args.no_mlflow, reuse=not args.force, address=args.address,
                      task=args.task, panoptic_threshold=args.panoptic_threshold,
                      allow_outside_paths=args.allow_outside_paths, eval_size=args.eval_size,
                      eval_max_size=args.eval_max_size, runtime=args.runtime, analysis=not args.no_analysis,
                      plots=args.plots)
    print(format_result(result))
    return 0


if __name__ == "__main__":
    sys.exit(module_main(sys.modules[__name__]))
