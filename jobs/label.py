"""Label images with a detector: any source in, a resumable Parquet dataset of detections out.

    detr label --model models:/detr-r50-coco@champion --input 's3://bucket/archive/2026/*.tar'
               --output s3://bucket/labels/2026 --concurrency 4 --batch-size 8 --score-threshold 0.5
    detr label --model run/model.pt --input photos/ --output labels/ --classes person,car
               --coco-json labels/coco_results.json --draw 20
    detr label --task panoptic --model models:/shapes-panoptic@champion --input photos/ --output pan/
               --coco-panoptic-json pan/panoptic.json

MODEL is a registry URI (models:/NAME@ALIAS, models:/NAME/VERSION), an MLflow run
(runs:/ID/model), one of our checkpoints or an official DETR checkpoint (COCO
class names), or a `detr export` folder (float32 or int8; it runs in its own runtime
unless `--runtime` names the other one). `--runtime onnxruntime|openvino` with a
checkpoint exports it once, on this driver, and ships the graph to the actors. INPUT is anything the pipelines read: folders, globs, archives,
ingested Parquet, COCO/YOLO/VOC, local or object-store URIs.

Ray Data streams the work: tasks decode and resize images (skipping those the
output already holds), model actors (`--concurrency`, one model load each, a GPU
each when the cluster has them) detect in batches of images of similar size, and
this driver commits rows in atomic Parquet parts, one row per image (OUT/labels),
unreadable images in an errors table (OUT/errors). Re-running the same command
resumes: every image ends up in exactly one row or one error, however often the
job was killed. OUT/manifest.json records the model, the settings and each run.

`--task panoptic` (a model with a mask head) adds to each row its panoptic
segments (category, is-thing, area, score, COCO RLE at the original size) and
writes its segment-id PNG (COCO panoptic encoding) to OUT/panoptic/ before the
row is committed; boxes come from the same forward pass.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from detr.errors import RaydetrError
from jobs.cli import add_eval_size_arguments, module_main
from pipelines.labelling.options import PRECISIONS, RUNTIMES, LabelOptions

if TYPE_CHECKING:
    from jobs.model_sources import LoadedModel
    from pipelines.labelling.writer import RunCounts

DEFAULTS = LabelOptions()


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model, or a checkpoint file")
    parser.add_argument("--input", required=True, help="folder, glob, archive(s), Parquet or annotated dataset; "
                                                       "local path or URI (s3://, gs://, ...)")
    parser.add_argument("--output", required=True, help="output folder or URI (re-runs resume into it)")
    parser.add_argument("--kind", choices=("coco", "yolo", "voc", "folder", "archive", "parquet"),
                        help="input kind (default: detected from the path)")
    parser.add_argument("--images", help="image folder of a COCO JSON input (default: the JSON's folder)")
    parser.add_argument("--task", choices=("detection", "panoptic"), default=DEFAULTS.task,
                        help="panoptic: also the segments and a panoptic PNG per image (a model with masks)")
    parser.add_argument("--panoptic-threshold", type=float, default=DEFAULTS.panoptic_threshold,
                        help="panoptic: keep queries whose top probability exceeds this (default: %(default)s)")
    parser.add_argument("--score-threshold", type=float, default=DEFAULTS.score_threshold,
                        help="keep detections scoring above this (default: the model's: 0.5 for softmax scores, 0.2 "
                             "for a focal-loss model's sigmoid scores; 0 keeps every query)")
    parser.add_argument("--top-k", type=int, default=DEFAULTS.top_k, help="at most this many detections per image")
    add_eval_size_arguments(parser)
    parser.add_argument("--classes", help="keep only these classes: names or ids, comma separated (person,car,3)")
    parser.add_argument("--coco-json", metavar="FILE", help="also write every detection as a COCO results JSON")
    parser.add_argument("--coco-panoptic-json", metavar="FILE",
                        help="panoptic: also write every image's segments as a COCO panoptic JSON "
                             "(its PNGs are OUT/panoptic/)")
    parser.add_argument("--draw", type=int, default=DEFAULTS.draw, metavar="N",
                        help="PNGs with drawn boxes for the first N images labelled (OUT/previews/)")
    parser.add_argument("--explain", type=int, default=DEFAULTS.explain, metavar="N",
                        help="attention pictures for the first N images labelled (OUT/explain/: each detection's "
                             "decoder attention, the encoder's at their centres; the torch runtime)")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default=DEFAULTS.precision,
                        help="bfloat16: several times faster on CPUs with AMX and on GPUs, scores within about 1e-2 "
                             "of float32's (default: %(default)s)")
    parser.add_argument("--runtime", choices=RUNTIMES, default=DEFAULTS.runtime,
                        help="where the model runs: PyTorch, or its ONNX export (made once, here) in ONNX Runtime "
                             "or OpenVINO, faster on CPUs (pip install 'raydetr[onnx]' / 'raydetr[openvino]'; "
                             "default: torch for a checkpoint, an export folder's own runtime)")
    parser.add_argument("--concurrency", type=int, default=DEFAULTS.concurrency, help="model actors")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, help="images per forward pass")
    parser.add_argument("--cpus-per-actor", type=float, default=DEFAULTS.cpus_per_actor,
                        help="CPUs reserved per actor, also its torch threads (default: %(default)s)")
    parser.add_argument("--gpus-per-actor", type=float, default=DEFAULTS.gpus_per_actor,
                        help="GPUs per actor (default: 1 when the cluster has GPUs, else 0)")
    parser.add_argument("--rows-per-file", type=int, default=DEFAULTS.rows_per_file,
                        help="commit a Parquet part when this many rows are buffered (default: %(default)s)")
    parser.add_argument("--commit-seconds", type=float, default=DEFAULTS.commit_seconds,
                        help="...or when this many seconds passed since the last commit (default: %(default)s)")
    parser.add_argument("--max-pixels", type=int, default=DEFAULTS.max_pixels,
                        help="reject larger images (decompression bombs)")
    parser.add_argument("--allow-outside-paths", action="store_true",
                        help="read images named outside their folder (absolute or '..' paths in an annotation file, links out "
                             "of a local folder); refused as unsafe_path by default")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    parser.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")


@dataclass
class LabelResult:
    """What a run did (`counts`) and what the output holds now (`totals`)."""

    output: str
    counts: RunCounts
    totals: dict
    seconds: float
    label_run: str
    removed_temporaries: int = 0
    task: str = "detection"
    score_threshold: float | None = None
    first_rows_seconds: float | None = None  # start-up: when the first labelled rows reached the driver
    first_rows: int = 0  # how many came then
    coco_json: str | None = None
    coco_detections: int = 0
    coco_panoptic_json: str | None = None
    coco_panoptic_images: int = 0
    manifest: dict = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return (self.counts.labelled + self.counts.errors) / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_images_per_s(self) -> float | None:
        """The rate once rows flow (start-up excluded: actors starting, models loading, the first batch)."""
        rest = self.counts.labelled + self.counts.errors - self.first_rows
        if self.first_rows_seconds is None or self.seconds <= self.first_rows_seconds or rest <= 0:
            return None  # everything came at once: no steady phase to speak of
        return rest / (self.seconds - self.first_rows_seconds)


def check_task(options: LabelOptions, loaded: LoadedModel, spec: str, coco_panoptic_json: str | None) -> None:
    """Refuse, before any work, a panoptic task without a mask head, or a panoptic export without the task."""
    if options.task == "panoptic" and not loaded.masks:
        raise RaydetrError(f"--task panoptic needs a model with a mask head; {spec} has none (DETRConfig.masks is "
                         "false): label it with --task detection, or use a panoptic model")
    if coco_panoptic_json and options.task != "panoptic":
        raise RaydetrError("--coco-panoptic-json needs --task panoptic")


def _gpus_per_actor(configured: float | None) -> float:
    import ray

    if configured is not None:
        return configured
    return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def label(model: str, input_path: str, output: str, options: LabelOptions = DEFAULTS, *, classes: str | None = None,
          kind: str | None = None, images: str | None = None, coco_json: str | None = None,
          coco_panoptic_json: str | None = None, tracking_uri: str | None = None,
          address: str | None = None) -> LabelResult:
    """Label `input_path` with `model` into `output` (resuming what is there); see the module docstring."""
    import ray

    from jobs.model_sources import check_model_spec
    from jobs.ray_session import connect
    from pipelines.sources import open_source
    from pipelines.sources.reader import folder_of_archives, start_listings
    from pipelines.storage import check_reachable

    # An object store's folder is listed by a task of its own, started first: its listing overlaps importing
    # torch, loading the model, scanning the output and starting the actors, and this driver never holds it
    # or its records.
    check_model_spec(model, allow_export=True)
    if options.runtime not in (None, "torch"):
        from pipelines.inference.runtimes import check_runtime

        check_runtime(options.runtime)  # not installed: one line, before anything starts
    source = open_source(input_path, kind, images=images, stream_listing=True,
                         allow_outside_paths=options.allow_outside_paths)
    check_reachable(output)
    connect(address)
    listings = start_listings(source)

    from detr.postprocess import default_score_threshold
    from jobs.model_sources import load_detector
    from pipelines.labelling.coco_export import write_coco_results
    from pipelines.labelling.manifest import ManifestRun
    from pipelines.labelling.options import parse_classes
    from pipelines.labelling.output import LabelOutput
    from pipelines.labelling.panoptic_export import write_coco_panoptic
    from pipelines.labelling.pipeline import build_label_dataset, check_cluster_fits
    from pipelines.labelling.writer import ChunkWriter, ModelIdentity

    loaded, detector = load_detector(model, tracking_uri, allow_export=True)
    options = options.for_model(default_score_threshold(detector.config), loaded.transforms, loaded.runtime,
                                loaded.precision if loaded.export is not None else None)
    transforms = options.transforms(loaded.transforms)
    check_task(options, loaded, model, coco_panoptic_json)
    if options.runtime != "torch":
        if options.explain:
            raise RaydetrError(f"--explain reads the attention of the PyTorch model: it needs --runtime torch, "
                               f"not {options.runtime}")
        from pipelines.inference.runtimes import check_model_runs_in, check_runtime

        check_runtime(options.runtime)
        check_model_runs_in(options.runtime, detector.config)
    options = dataclasses.replace(options, classes=parse_classes(classes, loaded.categories)) if classes else options
    # An exported runtime runs on the CPU: its actors reserve no GPU unless told to.
    gpus = _gpus_per_actor(options.gpus_per_actor) if options.runtime == "torch" else options.gpus_per_actor or 0.0
    check_cluster_fits(options, gpus, ray.cluster_resources())
    payload = loaded.payload(options.runtime, detector)  # for an exported runtime: the graph, exported once here

    out = LabelOutput(output)
    label_run = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    own_size = {"eval_size": loaded.transforms.eval_size, "eval_max_size": loaded.transforms.eval_max_size}
    manifest = ManifestRun.start(out, loaded.identity(), options.row_settings(), source.kind, own_size,
                                 label_run=label_run, input=input_path, model_uri=loaded.resolved.uri)
    removed = out.remove_temporaries()
    committed = out.scan()

    start = time.perf_counter()
    done = committed.keys.sorted_array()
    labelled, contents = committed.labelled_keys.sorted_array(), committed.contents.sorted_array()
    r = loaded.resolved
    writer = ChunkWriter(out, committed, ModelIdentity(r.name, r.version, r.run_id), label_run,
                         rows_per_file=options.rows_per_file, commit_seconds=options.commit_seconds, draw=options.draw,
                         explain=options.explain)
    writer.add_errors(source.planning_errors)
    first_rows_seconds, first_rows = None, 0

    def label_source(source, listings: dict) -> None:
        nonlocal first_rows_seconds, first_rows
        dataset = build_label_dataset(source, payload, transforms, options, done, gpus, listings,
                                      labelled, contents)
        for results in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            if first_rows_seconds is None:
                first_rows_seconds, first_rows = time.perf_counter() - start, results.num_rows
            writer.add(results)

    label_source(source, listings)
    if folder_of_archives(listings):
        # The folder's listing found only archives in it and read as no records: it is an archive source (what
        # detect_kind says of it when it lists the folder itself).
        label_source(open_source(input_path, "archive"), {})
    writer.flush()
    out.ensure_errors_part(writer.next_part, writer.part_suffix)
    seconds = time.perf_counter() - start

    c = writer.counts
    result = LabelResult(output, c, {}, seconds, label_run, removed, task=options.task,
                         score_threshold=options.score_threshold,
                         first_rows_seconds=first_rows_seconds, first_rows=first_rows)
    if coco_json:
        result.coco_json, result.coco_detections = coco_json, write_coco_results(out, coco_json)
    if coco_panoptic_json:
        result.coco_panoptic_json = coco_panoptic_json
        result.coco_panoptic_images = write_coco_panoptic(out, coco_panoptic_json, loaded.categories)
    result.totals = manifest.finish(
        labelled=c.labelled, errors=c.errors, detections=c.detections,
        **({"segments": c.segments} if options.task == "panoptic" else {}), parts=c.parts,
        rejected=dict(c.rejected), duplicates_dropped=c.duplicates_dropped, removed_temporaries=removed,
        already_done=committed.labelled + committed.errors, seconds=round(seconds, 3),
        images_per_s=round(result.images_per_s, 3),
        first_rows_seconds=None if first_rows_seconds is None else round(first_rows_seconds, 3),
        steady_images_per_s=None if result.steady_images_per_s is None else round(result.steady_images_per_s, 3))
    result.manifest = manifest.manifest
    return result


def format_result(result: LabelResult) -> str:
    c, t = result.counts, result.totals
    segments = f", {c.segments} segments" if result.task == "panoptic" else ""
    lines = [
        f"labelled {c.labelled} images ({c.detections} detections{segments}), {c.errors} errors, "
        f"in {result.seconds:.1f} s: {result.images_per_s:.2f} images/s" + (
            f" (first rows after {result.first_rows_seconds:.1f} s, then {result.steady_images_per_s:.2f} images/s)"
            if result.steady_images_per_s is not None else ""),
        f"output {result.output}: {t['images_labelled']} images labelled (labels/), {t['errors']} errors (errors/), "
        f"{t['detections']} detections in {t['parts']} parts; manifest {result.output}/manifest.json",
    ]
    if c.labelled and not c.detections:
        lines.append(f"no detection scored above {result.score_threshold}: a lower --score-threshold keeps more")
    if c.rejected:
        lines.append("errors by reason: " + ", ".join(f"{r} {n}" for r, n in sorted(c.rejected.items())))
    if c.previews:
        lines.append(f"{c.previews} previews in {result.output}/previews/")
    if c.explained:
        lines.append(f"{c.explained} images' attention pictures in {result.output}/explain/")
    if result.coco_json:
        lines.append(f"COCO results: {result.coco_detections} detections -> {result.coco_json}")
    if result.coco_panoptic_json:
        lines.append(f"COCO panoptic: {result.coco_panoptic_images} images -> {result.coco_panoptic_json} "
                     f"(PNGs in {result.output}/panoptic/)")
    if result.removed_temporaries:
        lines.append(f"removed {result.removed_temporaries} unfinished temporary files of an earlier run")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.model.startswith(("models:/", "runs:/")):
        from jobs.tracking import resolve_tracking_uri

        print(f"MLflow registry: {resolve_tracking_uri(args.tracking_uri)}", flush=True)  # which store, said first
    options = LabelOptions(
        task=args.task, panoptic_threshold=args.panoptic_threshold, score_threshold=args.score_threshold,
        top_k=args.top_k, precision=args.precision, runtime=args.runtime, batch_size=args.batch_size,
        concurrency=args.concurrency, cpus_per_actor=args.cpus_per_actor, gpus_per_actor=args.gpus_per_actor,
        rows_per_file=args.rows_per_file, commit_seconds=args.commit_seconds, draw=args.draw, explain=args.explain,
        max_pixels=args.max_pixels, allow_outside_paths=args.allow_outside_paths,
        eval_size=args.eval_size, eval_max_size=args.eval_max_size,
    )
    result = label(args.model, args.input, args.output, options, classes=args.classes, kind=args.kind,
                   images=args.images, coco_json=args.coco_json, coco_panoptic_json=args.coco_panoptic_json,
                   tracking_uri=args.tracking_uri, address=args.address)
    print(format_result(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(module_main(sys.modules[__name__]))
