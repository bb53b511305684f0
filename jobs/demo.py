"""The end-to-end demo: data -> distributed training -> evaluation -> registry promotion -> labelling.

    make demo          # or: detr demo [--workdir demo_output] [--minutes 8]

Runs on an embedded default: a local Ray started in this process and MLflow's own
default store, a SQLite database in the working directory (`mlflow.db`; set
MLFLOW_TRACKING_URI to use a server instead). It generates a synthetic dataset
of shapes, trains DETR from random weights with the fast recipe on two Ray Train
workers, evaluates the model with pycocotools, registers it and promotes it to the `champion` alias if it beats
the current champion, labels a folder of new images with `models:/NAME@champion`,
and prints where everything is.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

from jobs.cli import module_main

REGISTERED_MODEL = "raydetr-demo"
LABEL_SCORE_THRESHOLD = 0.2
"""The fast recipe's focal loss scores with sigmoids, lower than softmax DETR's (after the demo's
minutes of training its detections score about 0.2-0.8, median 0.5): 0.5, the softmax default, drops
about half of them."""


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="demo_output", help="where data, checkpoints and labels go")
    parser.add_argument("--minutes", type=float, default=8.0, help="training time budget")
    parser.add_argument("--images", type=int, default=2000, help="training images to generate")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    parser.add_argument("--label-images", type=int, default=40, help="new images to label at the end")
    parser.add_argument("--name", default=REGISTERED_MODEL, help="registered model name")


@dataclass
class DemoSettings:
    workdir: str
    minutes: float
    images: int
    workers: int
    label_images: int
    name: str


def _step(title: str) -> float:
    print(f"\n=== {title}", flush=True)
    return time.perf_counter()


def _done(start: float) -> None:
    print(f"    ({time.perf_counter() - start:.0f} s)", flush=True)


def make_data(settings: DemoSettings) -> dict[str, str]:
    from jobs.synthetic_data import SyntheticConfig, write_dataset

    data_dir = os.path.join(settings.workdir, "data")
    config = SyntheticConfig(images=settings.images, classes=4, min_objects=1, max_objects=3,
                             min_object_size=24, max_object_size=56, min_image_size=64, max_image_size=112,
                             val_fraction=0.1, seed=0)
    paths = write_dataset(data_dir, config, workers=2)
    inbox = os.path.join(settings.workdir, "inbox")
    new = SyntheticConfig(images=settings.label_images, classes=4, min_objects=1, max_objects=3,
                          min_object_size=24, max_object_size=56, min_image_size=64, max_image_size=112, seed=99)
    write_dataset(inbox, new)
    paths["inbox"] = os.path.join(inbox, "images")
    return paths


def train_config(settings: DemoSettings, paths: dict[str, str]):
    from jobs.train_config import load_train_config

    return load_train_config(None, [
        "recipe=fast", f"data.train={paths['train']}", f"data.val={paths['val']}",
        "model.preset=tiny", "model.num_queries=20",
        "schedule.epochs=1000", f"schedule.time_budget_minutes={settings.minutes}", "schedule.eval_every=1000",
        "schedule.log_every_steps=10", f"scaling.num_workers={settings.workers}",
        f"storage.path={os.path.join(settings.workdir, 'ray_results')}",
        f"storage.run_name=demo-{time.strftime('%Y%m%d-%H%M%S')}",
        "tracking.experiment=raydetr-demo", f"tracking.registered_model={settings.name}",
    ])


def demo(settings: DemoSettings) -> dict:
    import ray
    from mlflow.tracking import MlflowClient

    from jobs.evaluate import evaluate, format_result
    from jobs.label import format_result as format_label_result
    from jobs.label import label
    from jobs.promote import promote
    from jobs.tracking import resolve_tracking_uri
    from jobs.train import train
    from pipelines.labelling.options import LabelOptions

    os.makedirs(settings.workdir, exist_ok=True)
    tracking_uri = resolve_tracking_uri(None)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, logging_level="warning",
             log_to_driver=False)
    began = time.perf_counter()
    try:
        t = _step("1. Generate a synthetic dataset of shapes")
        paths = make_data(settings)
        print(f"    train {paths['train']}\n    val   {paths['val']}\n    new images to label {paths['inbox']}")
        _done(t)

        t = _step(f"2. Train DETR with {settings.workers} Ray Train workers ({settings.minutes:g} minutes)")
        result = train(train_config(settings, paths))
        print(f"    MLflow run {result.run_id}; registered {settings.name} version {result.registered_version}")
        _done(t)

        t = _step("3. Evaluate the new version on the held-out split (pycocotools)")
        candidate = result.registered_version
        evaluation = evaluate(f"models:/{settings.name}/{candidate}", paths["val"], tracking_uri=tracking_uri)
        print("    " + format_result(evaluation).replace("\n", "\n    "))
        _done(t)

        t = _step("4. Promote it to 'champion' if it beats the current champion")
        decision = promote(settings.name, candidate, paths["val"], alias="champion", min_gain=0.005,
                           tracking_uri=tracking_uri)
        print("    " + decision.describe())
        _done(t)

        t = _step(f"5. Label {settings.label_images} new images with models:/{settings.name}@champion (Ray Data)")
        # One output per champion version: an output holds one model's rows, and a second demo in the same
        # folder may promote another version (the same champion again resumes: nothing left to label).
        champion = MlflowClient(tracking_uri).get_model_version_by_alias(settings.name, "champion").version
        labelled = label(f"models:/{settings.name}@champion", paths["inbox"],
                         os.path.join(settings.workdir, "labels", f"v{champion}"),
                         LabelOptions(score_threshold=LABEL_SCORE_THRESHOLD, top_k=3, concurrency=2, batch_size=4,
                                      draw=8, explain=2), tracking_uri=tracking_uri)
        print("    " + format_label_result(labelled).replace("\n", "\n    "))
        _done(t)
    finally:
        ray.shutdown()
    print(f"\n=== Done in {(time.perf_counter() - began) / 60:.1f} minutes")
    print(f"    MLflow store:      {tracking_uri}")
    print(f"    see it:            mlflow ui --backend-store-uri {tracking_uri}")
    print(f"    best checkpoint:   {result.checkpoint_dir}")
    print(f"    champion model:    models:/{settings.name}@champion")
    print(f"    labels:            {labelled.output}/labels (Parquet), previews in {labelled.output}/previews, "
          f"attention in {labelled.output}/explain")
    return {"train": result, "evaluation": evaluation, "decision": decision, "labels": labelled, "paths": paths}


def run(args: argparse.Namespace) -> int:
    demo(DemoSettings(args.workdir, args.minutes, args.images, args.workers, args.label_images, args.name))
    return 0


if __name__ == "__main__":
    sys.exit(module_main(sys.modules[__name__]))
