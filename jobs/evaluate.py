"""Evaluate a detector on a labelled dataset: COCO box metrics with pycocotools, logged to MLflow.

    detr evaluate --model models:/shapes@champion --data data/val.json
    python -m jobs.evaluate --model run/model.pt --data s3://bucket/coco/val.json --concurrency 4
    detr evaluate --task panoptic --model models:/shapes-panoptic@champion --data data/panoptic_val.json

`--task panoptic` evaluates a model with masks on a COCO panoptic dataset: PQ, SQ
and RQ overall, for things and for stuff, and per class (torchmetrics'
PanopticQuality, at each image's original size against its PNG), and mask AP of
the things (pycocotools, iouType "segm"); logged the same way, with a per-class
table of PQ/SQ/RQ and mask AP.

Inference is distributed with Ray Data: model actors (one model load each)
consume evaluation batches that the data pipeline decodes, validates and resizes
with the model's own evaluation transform. The twelve standard COCO numbers and
per-class AP go to an MLflow run of their own, tagged with the model (name,
version, run) and the dataset's content digest, with a per-class table and a
precision-recall plot as artifacts. An evaluation of the same registered model
version on data with the same digest is reused instead of recomputed (unless
`--force`).
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field

from detr.config import PANOPTIC_THRESHOLD
from detr.errors import RaydetrError
from jobs.cli import module_main
from jobs.ray_session import connect

EVAL_EXPERIMENT = "raydetr-evaluations"
TAG_JOB = "raydetr.job"
TAG_DIGEST = "raydetr.dataset_digest"
TAG_MODEL_NAME = "raydetr.model_name"
TAG_MODEL_VERSION = "raydetr.model_version"
TAG_MODEL_URI = "raydetr.model_uri"
TAG_TASK = "raydetr.task"
TASKS = ("detection", "panoptic")
PANOPTIC_STATS = ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint file, official DETR file, or MLflow model URI")
    parser.add_argument("--data", required=True, help="labelled source: COCO JSON, YOLO/VOC folder, Parquet")
    parser.add_argument("--images", help="image folder of a COCO JSON when it is not the JSON's folder")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=1, help="model actors (each loads the model once)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    parser.add_argument("--experiment", default=EVAL_EXPERIMENT)
    parser.add_argument("--no-mlflow", action="store_true", help="print the metrics without logging them")
    parser.add_argument("--force", action="store_true", help="recompute even if a matching evaluation exists")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or local)")
    parser.add_argument("--task", choices=TASKS, default="detection",
                        help="detection: box AP; panoptic: PQ/SQ/RQ and mask AP (a model with masks, COCO panoptic data)")
    parser.add_argument("--panoptic-threshold", type=float, default=PANOPTIC_THRESHOLD,
                        help="panoptic: keep queries whose top probability exceeds this (the paper's 0.85)")


@dataclass
class EvalResult:
    metrics: dict[str, float]
    per_class: dict[int, float]
    digest: str
    images: int
    run_id: str | None = None
    reused: bool = False
    categories: list[dict] = field(default_factory=list)
    task: str = "detection"
    per_class_panoptic: dict[int, dict] = field(default_factory=dict)


def _load_detector(checkpoint, threads: int):
    """The job's model in an actor: checkpoint bytes (or their object-store reference, so an actor on any
    node can load a model the driver downloaded) -> the Detector's inference copy, the one loader every job
    uses (official checkpoints padding-invariant, as labelling runs them)."""
    import torch

    from pipelines.inference.detector import Detector

    torch.set_num_threads(threads)
    if not isinstance(checkpoint, (bytes, bytearray)):
        import ray

        checkpoint = ray.get(checkpoint)
    return Detector.from_checkpoint(bytes(checkpoint))


class EvalPredictor:
    """Ray Data actor: loads the model once, turns evaluation sample batches into detections."""

    def __init__(self, checkpoint, mean: tuple, std: tuple, threads: int = 1) -> None:
        detector = _load_detector(checkpoint, threads)
        self.model = detector.model
        self.postprocess = detector.postprocess()
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, batch: dict) -> dict:
        import numpy as np
        import torch

        from detr import boxes_only, forward_inference
        from pipelines.training.collate import collate_samples

        images, mask, targets = collate_samples(batch, self.mean, self.std)
        outputs = forward_inference(self.model, images, mask, mask_queries=boxes_only)
        sizes = torch.stack([t["orig_size"] for t in targets])
        detections = self.postprocess(outputs, sizes)
        return {
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


class PanopticPredictor:
    """Ray Data actor: a model with masks -> per image the panoptic segmentation and the thing instances'
    masks (COCO RLE), both at the original image size."""

    def __init__(self, checkpoint, mean: tuple, std: tuple, is_thing: dict, threshold: float,
                 threads: int = 1) -> None:
        detector = _load_detector(checkpoint, threads)
        self.model = detector.model
        self.is_thing = {int(k): bool(v) for k, v in is_thing.items()}
        self.panoptic = detector.panoptic_postprocess(self.is_thing, threshold)
        self.instances = detector.instance_postprocess()
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, batch: dict) -> dict:
        import json

        import numpy as np

        from detr import forward_inference, masks_to_rle
        from pipelines.training.collate import collate_samples
        from pipelines.validation.panoptic import encode_panoptic_png

        images, mask, targets = collate_samples(batch, self.mean, self.std)
        outputs = forward_inference(self.model, images, mask)  # every query's mask: mask AP ranks all detections
        processed = [tuple(int(v) for v in t["size"]) for t in targets]
        original = [tuple(int(v) for v in t["orig_size"]) for t in targets]
        segmentations = self.panoptic(outputs, processed, original)
        instances = self.instances(outputs, processed, original)
        pngs, segments, results = [], [], []
        for seg, inst in zip(segmentations, instances):
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


def find_evaluation(tracking_uri: str, model_name: str, version: str, digest: str, task: str = "detection"):
    """The latest finished evaluation run of this model version on data with this digest, or None."""
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
    runs = [r for r in runs if r.data.tags.get(TAG_TASK, "detection") == task]
    return runs[0] if runs else None


def _plot_pr_curves(pr_curves: dict[int, list[float]], names: dict[int, str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    recall = np.linspace(0, 1, 101)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for cat_id, precision in sorted(pr_curves.items()):
        ax.plot(recall, precision, label=names.get(cat_id, str(cat_id)))
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title("Precision-recall per class (IoU 0.5)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize="small", loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _log_evaluation(tracking_uri: str, experiment: str, model, data: str, result: EvalResult, stats: dict) -> str:
    from jobs.tracking import TrackedRun

    tags = {TAG_JOB: "evaluate", TAG_DIGEST: result.digest, TAG_MODEL_URI: model.uri, TAG_MODEL_NAME: model.name,
            TAG_MODEL_VERSION: model.version, "raydetr.model_run_id": model.run_id, "raydetr.data_source": data}
    run = TrackedRun.start(tracking_uri, experiment, f"eval-{model.name}-v{model.version or 'file'}", tags=tags)
    run.log_params({"model": model.uri, "data": data, "dataset_digest": result.digest, "images": result.images})
    names = {int(c["id"]): str(c["name"]) for c in result.categories}
    per_class_metrics = {f"AP_class/{names.get(k, k)}": v for k, v in result.per_class.items() if not math.isnan(v)}
    run.log_metrics({**result.metrics, **per_class_metrics}, step=0)
    with tempfile.TemporaryDirectory() as tmp:
        table = os.path.join(tmp, "per_class_ap.csv")
        with open(table, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["category_id", "name", "AP"])
            for cat_id, ap in sorted(result.per_class.items()):
                writer.writerow([cat_id, names.get(cat_id, ""), f"{ap:.6f}"])
        run.log_artifact(table)
        plot = os.path.join(tmp, "precision_recall.png")
        _plot_pr_curves(stats["pr_curves"], names, plot)
        run.log_artifact(plot)
    run.finish()
    if model.version:
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri=tracking_uri).set_model_version_tag(
            model.name, model.version, f"raydetr.eval.{result.digest[:12]}.AP", f"{result.metrics['AP']:.6f}")
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
) -> EvalResult:
    """Evaluate `model_spec` on `data`; returns the metrics (and the MLflow run id when logged)."""
    if task not in TASKS:
        raise RaydetrError(f"unknown task {task!r}; choose from {TASKS}")
    import ray
    from ray.data import ActorPoolStrategy

    from detr.evaluation import STAT_NAMES, coco_ground_truth, evaluate_coco
    from jobs.model_sources import load_model
    from jobs.tracking import ensure_tracking_available, resolve_tracking_uri
    from pipelines.sources import open_source
    from pipelines.tools.digest import dataset_digest
    from pipelines.training.dataset import build_detection_dataset

    uri = resolve_tracking_uri(tracking_uri)
    if log_to_mlflow:
        ensure_tracking_available(uri)
    loaded = load_model(model_spec, uri)
    if task == "panoptic" and not loaded.masks:
        raise RaydetrError(f"--task panoptic needs a model with masks; {model_spec} has none (DETRConfig.masks)")
    model = loaded.resolved
    source = open_source(data, images=images)
    connect(address)
    digest = dataset_digest(source)
    if task == "panoptic" and not source.is_panoptic:
        raise RaydetrError(f"{data}: --task panoptic needs a COCO panoptic dataset (a JSON with segments_info)")
    if reuse and log_to_mlflow and model.version:
        previous = find_evaluation(uri, model.name, model.version, digest.digest, task)
        if previous is not None:
            names = STAT_NAMES if task == "detection" else PANOPTIC_STATS
            metrics = {k: previous.data.metrics[k] for k in names if k in previous.data.metrics}
            return EvalResult(metrics, {}, digest.digest, digest.images, previous.info.run_id, reused=True,
                              categories=source.categories or [], task=task)

    transforms = loaded.transforms
    checkpoint = ray.put(loaded.checkpoint)  # actors on any node load the model from the object store
    dataset = build_detection_dataset(source, train=False, transforms=transforms, seed=0, shuffle=False)
    if task == "panoptic":
        result, stats = _evaluate_panoptic(checkpoint, source, dataset, transforms, batch_size, concurrency,
                                           panoptic_threshold, digest.digest)
        if log_to_mlflow:
            result.run_id = _log_panoptic_evaluation(uri, experiment, model, data, result)
        return result
    predictions = dataset.dataset.map_batches(
        EvalPredictor,
        fn_constructor_kwargs={"checkpoint": checkpoint, "mean": transforms.mean, "std": transforms.std},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=concurrency),
        num_cpus=1,
    )
    detections, targets = {}, []
    for row in predictions.iter_rows():
        image_id = int(row["image_id"])
        detections[image_id] = {"boxes": row["det_boxes"], "scores": row["det_scores"], "labels": row["det_labels"]}
        targets.append({"image_id": image_id, "orig_size": row["orig_size"], "size": row["size"],
                        "boxes": row["gt_boxes"], "labels": row["gt_labels"], "area": row["area"],
                        "iscrowd": row["iscrowd"]})
    import numpy as np
    import torch

    detections = {k: {n: torch.from_numpy(np.array(v)) for n, v in d.items()} for k, d in detections.items()}
    categories = source.categories or loaded.categories or []
    ground_truth = coco_ground_truth(targets, categories)
    stats = evaluate_coco(ground_truth, detections, image_ids=[im["id"] for im in ground_truth["images"]])
    metrics = {name: float(stats[name]) for name in STAT_NAMES}
    result = EvalResult(metrics, stats["per_class"], digest.digest, len(ground_truth["images"]),
                        categories=list(categories))
    if dataset.errors is not None:
        rejected = dataset.errors.errors()
        if rejected:
            print(f"{len(rejected)} records rejected by validation (not evaluated): "
                  f"{dataset.errors.summary().format()}", flush=True)
    if log_to_mlflow:
        result.run_id = _log_evaluation(uri, experiment, model, data, result, stats)
    return result


def _evaluate_panoptic(checkpoint, source, dataset, transforms, batch_size: int, concurrency: int, threshold: float,
                       digest: str) -> tuple[EvalResult, dict]:
    """PQ against the panoptic PNGs at original size, and mask AP of things, from PanopticPredictor actors."""
    import json

    from ray.data import ActorPoolStrategy

    from detr.panoptic_evaluation import PanopticEvaluator, instance_ground_truth, mask_ap
    from pipelines.sources import iter_records
    from pipelines.storage import read_bytes
    from pipelines.validation.panoptic import decode_panoptic_png, panoptic_categories

    categories = source.categories or []
    is_thing = panoptic_categories(categories)
    predictions = dataset.dataset.map_batches(
        PanopticPredictor,
        fn_constructor_kwargs={"checkpoint": checkpoint, "mean": transforms.mean, "std": transforms.std,
                               "is_thing": is_thing, "threshold": threshold},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=concurrency),
        num_cpus=1,
    )
    records = {int(r["image_id"]): r for r in iter_records(source)}
    evaluator = PanopticEvaluator(categories)
    images, annotations, results = [], [], []
    for row in predictions.iter_rows():
        image_id = int(row["image_id"])
        record = records[image_id]
        gt_ids = decode_panoptic_png(read_bytes(record["panoptic_path"]), record["panoptic_path"])
        gt_segments = [{"id": int(a), "category_id": int(c), "iscrowd": int(k)} for a, c, k in
                       zip(record["annotation_ids"], record["category_ids"], record["iscrowd"])]
        pred_ids = decode_panoptic_png(bytes(row["panoptic_png"]))
        evaluator.update(pred_ids, json.loads(str(row["segments_info"])), gt_ids, gt_segments)
        images.append({"id": image_id, "height": int(gt_ids.shape[0]), "width": int(gt_ids.shape[1])})
        annotations += instance_ground_truth(image_id, gt_ids, gt_segments, is_thing, len(annotations) + 1)
        results += [{**r, "image_id": image_id} for r in json.loads(str(row["mask_results"]))]
    stats = evaluator.compute()
    things = [c for c in categories if is_thing.get(int(c["id"]), True)]
    segm = mask_ap({"images": images, "annotations": annotations, "categories": things}, results)
    metrics = {name: float(stats[name]) for name in PANOPTIC_STATS}
    metrics.update({k: float(v) for k, v in segm.items() if k.startswith("segm_")})
    per_class = {cat: {**values, "mask_AP": segm["per_class"].get(cat, float("nan"))}
                 for cat, values in stats["per_class"].items()}
    if dataset.errors is not None and dataset.errors.errors():
        print(f"{len(dataset.errors.errors())} records rejected by validation (not evaluated): "
              f"{dataset.errors.summary().format()}", flush=True)
    result = EvalResult(metrics, {c: v["PQ"] for c, v in per_class.items()}, digest, len(images),
                        categories=list(categories), task="panoptic", per_class_panoptic=per_class)
    return result, stats


def _log_panoptic_evaluation(tracking_uri: str, experiment: str, model, data: str, result: EvalResult) -> str:
    from jobs.tracking import TrackedRun

    tags = {TAG_JOB: "evaluate", TAG_TASK: "panoptic", TAG_DIGEST: result.digest, TAG_MODEL_URI: model.uri,
            TAG_MODEL_NAME: model.name, TAG_MODEL_VERSION: model.version, "raydetr.model_run_id": model.run_id,
            "raydetr.data_source": data}
    run = TrackedRun.start(tracking_uri, experiment, f"panoptic-eval-{model.name}-v{model.version or 'file'}",
                           tags=tags)
    run.log_params({"model": model.uri, "data": data, "dataset_digest": result.digest, "images": result.images,
                    "task": "panoptic"})
    names = {int(c["id"]): str(c["name"]) for c in result.categories}
    per_class = {f"PQ_class/{names.get(k, k)}": v["PQ"] for k, v in result.per_class_panoptic.items()}
    run.log_metrics({k: v for k, v in {**result.metrics, **per_class}.items() if not math.isnan(v)}, step=0)
    with tempfile.TemporaryDirectory() as tmp:
        table = os.path.join(tmp, "per_class_pq.csv")
        things = {int(c["id"]): bool(c.get("isthing", 1)) for c in result.categories}
        with open(table, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["category_id", "name", "isthing", "PQ", "SQ", "RQ", "TP", "FP", "FN", "mask_AP"])
            for cat_id, v in sorted(result.per_class_panoptic.items()):
                writer.writerow([cat_id, names.get(cat_id, ""), int(things.get(cat_id, True)), f"{v['PQ']:.6f}",
                                 f"{v['SQ']:.6f}", f"{v['RQ']:.6f}", v["TP"], v["FP"], v["FN"],
                                 "" if v["mask_AP"] != v["mask_AP"] else f"{v['mask_AP']:.6f}"])
        run.log_artifact(table)
    run.finish()
    if model.version:
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri=tracking_uri).set_model_version_tag(
            model.name, model.version, f"raydetr.eval.{result.digest[:12]}.PQ", f"{result.metrics['PQ']:.6f}")
    return run.run_id


def format_result(result: EvalResult) -> str:
    names = {int(c["id"]): str(c["name"]) for c in result.categories}
    lines = [f"dataset digest {result.digest} ({result.images} images)"
             + (f"; reused evaluation run {result.run_id}" if result.reused else "")]
    lines += [f"  {name:<10} {value:7.4f}" for name, value in result.metrics.items()]
    if result.per_class_panoptic:
        lines.append("  per class:       PQ      SQ      RQ  mask AP")
        for k, v in sorted(result.per_class_panoptic.items()):
            lines.append(f"    {names.get(k, str(k)):<10} {v['PQ']:7.4f} {v['SQ']:7.4f} {v['RQ']:7.4f} {v['mask_AP']:7.4f}")
    elif result.per_class:
        lines.append("  per-class AP:")
        lines += [f"    {names.get(k, str(k)):<20} {v:7.4f}" for k, v in sorted(result.per_class.items())]
    if result.run_id and not result.reused:
        lines.append(f"MLflow run {result.run_id}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    result = evaluate(args.model, args.data, images=args.images, batch_size=args.batch_size,
                      concurrency=args.concurrency, tracking_uri=args.tracking_uri, experiment=args.experiment,
                      log_to_mlflow=not args.no_mlflow, reuse=not args.force, address=args.address,
                      task=args.task, panoptic_threshold=args.panoptic_threshold)
    print(format_result(result))
    return 0


if __name__ == "__main__":
    sys.exit(module_main(sys.modules[__name__]))
