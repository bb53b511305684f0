"""`detr label` on the shared two-node Ray cluster: a messy folder, a tar archive, ingested Parquet
with a registered model, exported runtimes. (Prefixes and archives on an object store, two jobs at once into
one output and a driver killed mid-run are labelled on the production topology: tests/test_topology_jobs.py.)

Every test checks that rows + errors add up to the input, each image once, and
that the detections equal a direct `Detector` call on the same decoded image
(same boxes to 1e-3).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torchvision.ops import clip_boxes_to_image
from PIL import Image

import detr
from jobs.cli import main as detr_cli
from jobs.synthetic_data import SyntheticConfig, write_dataset
from messy_data import corrupt_jpeg, encode, rgb_image, write_messy_coco
from pipelines.inference.detector import Detector, transforms_to_metadata
from pipelines.labelling.output import ERRORS, LABELS, LabelOutput
from pipelines.training.transforms import TransformsConfig
from pipelines.validation.decode import decode_image
from query_classes import fit_query_classes

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
CATEGORIES = [{"id": i, "name": n} for i, n in enumerate(["circle", "square", "triangle", "star"], start=1)]


def save_tiny(path: Path, transforms: TransformsConfig) -> str:
    """A random `tiny` DETR whose queries disagree on the class: its class head is fitted (on the
    decoder outputs for a few random images) to give query q the class q % 4 + 1. An untouched random
    model calls every query the same class, which would leave a class filter nothing to filter."""
    torch.manual_seed(0)
    model = detr.build_model("tiny", num_classes=5).eval()
    fit_query_classes(model, transforms, (96, 128))
    detr.save_checkpoint(model, path, {"categories": CATEGORIES, "transforms": transforms_to_metadata(transforms)})
    return str(path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return save_tiny(tmp_path_factory.mktemp("model") / "tiny.pt", TransformsConfig.small())


def synthetic_images(folder: Path, n: int, seed: int) -> list[Path]:
    config = SyntheticConfig(images=n, min_image_size=64, max_image_size=128, image_format="jpg", seed=seed)
    write_dataset(str(folder), config)
    return sorted((folder / "images").iterdir())


def expected_detections(checkpoint: str, data: bytes, key: str, threshold: float, top_k: int | None,
                        classes: set[int] | None = None, eval_size: int | None = None) -> dict:
    """The reference: decode the file, one `Detector.detect` call on it alone with the model as trained (not
    the inference copy the job's actors run: folded norms, channels-last), at the model's evaluation size or
    `eval_size`, then the class filter and top-k."""
    image = decode_image(data, key).array
    detector = Detector.from_checkpoint(checkpoint, score_threshold=threshold, optimize=False)
    if eval_size is not None:
        detector = dataclasses.replace(detector, transforms=detector.transforms.at_eval_size(eval_size))
    det = detector.detect([image])[0]
    keep = [i for i in det["scores"].argsort(descending=True).tolist()
            if classes is None or int(det["labels"][i]) in classes][:top_k]
    boxes = clip_boxes_to_image(det["boxes"][keep], image.shape[:2])  # a labelled box lies in its image
    return {"shape": image.shape[:2], "boxes": boxes.numpy(), "scores": det["scores"][keep].numpy(),
            "labels": det["labels"][keep].tolist()}


def assert_rows_match_direct_calls(rows: list[dict], read, checkpoint: str, threshold: float, top_k: int | None,
                                   classes: set[int] | None = None, eval_size: int | None = None) -> int:
    """Each row equals the reference for its image; returns the number of detections compared."""
    compared = 0
    for row in rows:
        data = read(row["key"])
        want = expected_detections(checkpoint, data, row["key"], threshold, top_k, classes, eval_size)
        assert (row["height"], row["width"]) == want["shape"], row["key"]
        assert row["content_hash"] == hashlib.sha256(data).hexdigest()
        assert row["labels"] == want["labels"], row["key"]
        np.testing.assert_allclose(np.asarray(row["boxes"]).reshape(-1, 4), want["boxes"], atol=1e-3)
        np.testing.assert_allclose(row["scores"], want["scores"], atol=1e-4)
        assert row["label_names"] == [CATEGORIES[i - 1]["name"] for i in row["labels"]]
        compared += len(row["labels"])
    return compared


def committed_keys(out: str) -> tuple[list[str], list[str]]:
    """Every key in every committed part, duplicates included (no reader-side deduplication)."""
    output = LabelOutput(out)

    def keys(kind: str, column: str) -> list[str]:
        tables = (pq.read_table(p, columns=[column], filesystem=output.fs) for _, p in output.parts(kind))
        return [k for table in tables for k in table[column].to_pylist()]

    return keys(LABELS, "key"), keys(ERRORS, "image")


def test_label_a_messy_folder_then_rerun_changes_nothing(ray_cluster, checkpoint, tmp_path, capsys):
    _, expected = write_messy_coco(str(tmp_path / "in" / "messy"))
    synthetic_images(tmp_path / "in" / "shapes", 10, seed=1)
    inputs = sorted(str(p) for p in (tmp_path / "in").rglob("*") if p.suffix in (".jpg", ".png"))
    assert len(inputs) == 20
    out, coco = str(tmp_path / "out"), str(tmp_path / "coco.json")
    argv = ["label", "--model", checkpoint, "--input", str(tmp_path / "in"), "--output", out,
            "--score-threshold", "0.2", "--top-k", "5", "--concurrency", "2", "--batch-size", "3",
            "--rows-per-file", "6", "--draw", "3", "--explain", "2", "--coco-json", coco]
    assert detr_cli(argv) == 0
    printed = capsys.readouterr().out
    assert "labelled 16 images" in printed and "4 errors" in printed and "3 previews" in printed
    assert "2 images' attention pictures" in printed

    labels, errors = committed_keys(out)
    assert sorted(labels + errors) == inputs and len(set(labels + errors)) == len(inputs)  # each exactly once
    reasons = {Path(e["image"]).name: e["reason"] for e in LabelOutput(out).read(ERRORS).to_pylist()}
    assert reasons == {name: why for name, why in expected.items() if why not in ("kept", "read_error")}
    rows = LabelOutput(out).read(LABELS).to_pylist()
    rotated = next(r for r in rows if r["key"].endswith("rotated.jpg"))
    assert (rotated["width"], rotated["height"]) == (48, 64)  # EXIF orientation applied: as displayed
    assert all((r["model_name"], r["model_version"], r["model_run_id"]) == ("tiny", "", "") for r in rows)
    compared = assert_rows_match_direct_calls(rows, lambda k: Path(k).read_bytes(), checkpoint, 0.2, 5)
    assert compared > 16 and all(len(r["labels"]) <= 5 for r in rows)

    manifest = LabelOutput(out).read_manifest()
    assert manifest["status"] == "complete" and manifest["settings"] == {"task": "detection", "score_threshold": 0.2,
                                                                         "top_k": 5, "classes": None,
                                                                         "precision": "float32", "runtime": "torch",
                                                                         "eval_size": 128, "eval_max_size": 213}
    assert manifest["totals"]["images_labelled"] == 16 and manifest["totals"]["detections"] == compared
    run = manifest["runs"][-1]
    assert 0 < run["first_rows_seconds"] <= run["seconds"]  # start-up, then the steady rate after it, when rows
    # came after the first ones (20 images are two blocks here, which may reach the driver together): the manifest
    # and the printed summary say the same either way; the rate itself is computed in the test below.
    steady = run["steady_images_per_s"]
    assert ("first rows after" in printed) == (steady is not None) and (steady is None or steady > 0)
    results = json.loads(Path(coco).read_text())
    assert len(results) == compared and {r["image_id"] for r in results} == {r["image_id"] for r in rows}
    previews = sorted(Path(out, "previews").iterdir())
    assert len(previews) == 3 and all(Image.open(p).format == "PNG" for p in previews)
    explained = sorted(p.name for p in Path(out, "explain").iterdir())
    assert len(explained) == 4 and {name.rsplit("_", 1)[1] for name in explained} == {"decoder.png", "encoder.png"}
    assert all(Image.open(Path(out, "explain", name)).format == "PNG" for name in explained)

    # The same command again: nothing left to do, no file touched. A driver killed at the worst moment leaves
    # half a part under its hidden temporary name; the next run removes one written long ago (a recent one could
    # be a concurrent run's write in progress, which is left alone). Driver kills: tests/test_topology_jobs.py.
    before = {p: p.stat().st_mtime_ns for p in Path(out).rglob("*.parquet")}
    half = Path(out) / LABELS / ".part-000999.parquet.tmp-0badf00d"
    half.write_bytes(b"PAR1 half written")
    os.utime(half, (time.time() - 3600,) * 2)
    assert detr_cli(argv) == 0
    printed = capsys.readouterr().out
    assert "labelled 0 images (0 detections), 0 errors" in printed and not half.exists()
    assert {p: p.stat().st_mtime_ns for p in Path(out).rglob("*.parquet")} == before
    assert len(LabelOutput(out).read_manifest()["runs"]) == 2

    # Another threshold or evaluation size into the same output is refused, with the reason.
    assert detr_cli([*argv[:7], "--score-threshold", "0.5"]) == 1
    assert "score_threshold 0.2 (now 0.5)" in capsys.readouterr().err
    assert detr_cli([*argv, "--eval-size", "96"]) == 1
    assert "eval_size 128 (now 96)" in capsys.readouterr().err


def write_tar(path: Path, images: list[Path]) -> list[str]:
    """A tar of `images` plus a corrupt, an empty and an unsafe member; returns every member's key."""
    members = [(f"photos/{p.name}", p.read_bytes()) for p in images]
    members += [("photos/corrupt.jpg", corrupt_jpeg()), ("photos/empty.png", b""),
                ("../escape.jpg", encode(rgb_image(9), "JPEG"))]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return sorted(f"{path}!{name}" for name, _ in members)


def test_label_a_tar_archive_with_a_class_filter_at_a_smaller_size(ray_cluster, checkpoint, tmp_path):
    from jobs.label import label
    from pipelines.labelling.options import LabelOptions

    images = synthetic_images(tmp_path / "shapes", 12, seed=2)
    archive = tmp_path / "batch.tar"
    keys = write_tar(archive, images)
    out = str(tmp_path / "out")
    # The model evaluates at 128 px (shorter side); this run at 96, as a user trades accuracy for speed.
    options = LabelOptions(score_threshold=0.0, top_k=4, batch_size=4, concurrency=2, eval_size=96)
    result = label(checkpoint, str(archive), out, options, classes="circle,3")
    assert (result.counts.labelled, result.counts.errors) == (12, 3)
    labels, errors = committed_keys(out)
    assert sorted(labels + errors) == keys and len(set(labels + errors)) == len(keys)
    assert dict(result.counts.rejected) == {"decode_error": 1, "zero_byte": 1, "unsafe_archive_member": 1}

    members = {f"{archive}!photos/{p.name}": p.read_bytes() for p in images}
    rows = LabelOutput(out).read(LABELS).to_pylist()
    compared = assert_rows_match_direct_calls(rows, members.__getitem__, checkpoint, 0.0, 4, classes={1, 3},
                                              eval_size=96)
    assert compared > 0 and {label for r in rows for label in r["labels"]} <= {1, 3}
    assert LabelOutput(out).read_manifest()["settings"]["eval_size"] == 96
    key, data = next(iter(members.items()))
    at_own_size = expected_detections(checkpoint, data, key, 0.0, 4, {1, 3})["boxes"]
    boxes = np.asarray(next(r for r in rows if r["key"] == key)["boxes"]).reshape(-1, 4)
    assert boxes.shape != at_own_size.shape or not np.allclose(boxes, at_own_size, atol=1e-3)  # the size mattered
    unfiltered = {label for k, d in members.items() for label in expected_detections(checkpoint, d, k, 0.0, 4)["labels"]}
    assert unfiltered - {1, 3}  # the model's best four include other classes: the filter removed them


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_an_exported_runtime_labels_what_pytorch_does(ray_cluster, checkpoint, tmp_path, runtime):
    """In ONNX Runtime the driver exports the checkpoint once and ships the graph; in OpenVINO the model is a
    `detr export` folder, which runs in its own runtime with nothing else. Either way the rows equal direct
    PyTorch calls (to 1e-3 in the boxes), the manifest says which runtime made them, and a re-run with another
    runtime is refused. An int8 export folder labels too, and the manifest says int8."""
    from detr.errors import RaydetrError
    from jobs.label import label
    from pipelines.inference.export_package import read_export_package
    from pipelines.labelling.options import LabelOptions

    images = str(tmp_path / "shapes" / "images")
    synthetic_images(tmp_path / "shapes", 6, seed=7)
    out = str(tmp_path / "out")
    model = checkpoint
    if runtime == "openvino":
        model = str(tmp_path / "export")
        assert detr_cli(["export", "--model", checkpoint, "--format", "openvino", "--output", model]) == 0
    options = LabelOptions(score_threshold=0.0, top_k=4, batch_size=4, concurrency=1,
                           runtime=runtime if runtime == "onnxruntime" else None)
    assert label(model, images, out, options).counts.labelled == 6
    rows = LabelOutput(out).read(LABELS).to_pylist()
    assert assert_rows_match_direct_calls(rows, lambda key: Path(key).read_bytes(), checkpoint, 0.0, 4) > 0
    manifest = LabelOutput(out).read_manifest()
    assert (manifest["settings"]["runtime"], manifest["settings"]["precision"]) == (runtime, "float32")
    if runtime == "openvino":
        assert manifest["model"]["sha256"] == read_export_package(model).sha256
        assert {r["model_name"] for r in rows} == {"tiny"}  # the model the export came from
    with pytest.raises(RaydetrError, match=f"runtime '{runtime}' \\(now 'torch'\\)"):
        label(checkpoint, images, out, dataclasses.replace(options, runtime="torch"))
    if runtime == "onnxruntime":
        return
    int8 = str(tmp_path / "int8")
    assert detr_cli(["export", "--model", checkpoint, "--precision", "int8", "--calibration", images,
                     "--output", int8]) == 0
    result = label(int8, images, str(tmp_path / "out-int8"), options)
    assert (result.counts.labelled, result.counts.errors) == (6, 0)
    manifest = LabelOutput(str(tmp_path / "out-int8")).read_manifest()
    assert (manifest["settings"]["runtime"], manifest["settings"]["precision"]) == ("onnxruntime", "int8")
    int8_rows = {r["key"]: r for r in LabelOutput(str(tmp_path / "out-int8")).read(LABELS).to_pylist()}
    float_rows = {r["key"]: r for r in rows}
    assert int8_rows.keys() == float_rows.keys()
    for key, row in int8_rows.items():
        boxes = np.asarray(row["boxes"]).reshape(-1, 4)
        assert len(row["labels"]) == 4 and (boxes[:, 2:] <= [row["width"], row["height"]]).all()
        # int8 is not float32: its scores differ, but stay close (a random model's scores sit near each other)
        assert np.abs(np.sort(row["scores"]) - np.sort(float_rows[key]["scores"])).max() < 0.15


@pytest.mark.mlflow
def test_label_ingested_parquet_with_a_registered_model(ray_cluster, mlflow_server, checkpoint, tmp_path):
    from mlflow.tracking import MlflowClient

    from jobs.label import label
    from jobs.mlflow_model import log_detector_model
    from pipelines.labelling.options import LabelOptions

    paths = write_dataset(str(tmp_path / "shapes"), SyntheticConfig(images=10, min_image_size=64, max_image_size=128,
                                                                     seed=3))
    (tmp_path / "shapes" / "images" / "000004.png").write_bytes(b"")  # ingest rejects it into its own errors
    assert detr_cli(["ingest", paths["train"], str(tmp_path / "ingested"), "--rows-per-shard", "4"]) == 0
    shards = pq.read_table(tmp_path / "ingested" / "data", columns=["key", "image"]).to_pylist()
    assert len(shards) == 9

    client = MlflowClient(mlflow_server)
    run = client.create_run(client.create_experiment("label-test"))
    info = log_detector_model(mlflow_server, run.info.run_id, checkpoint, registered_model_name="label-tiny")
    client.set_terminated(run.info.run_id)
    client.set_registered_model_alias("label-tiny", "champion", info.registered_model_version)

    out = str(tmp_path / "out")
    result = label("models:/label-tiny@champion", str(tmp_path / "ingested"), out,
                   LabelOptions(score_threshold=0.1, batch_size=2), tracking_uri=mlflow_server)
    assert (result.counts.labelled, result.counts.errors) == (9, 0)
    rows = LabelOutput(out).read(LABELS).to_pylist()
    assert sorted(r["key"] for r in rows) == sorted(s["key"] for s in shards)
    assert {(r["model_name"], r["model_version"], r["model_run_id"]) for r in rows} == \
        {("label-tiny", str(info.registered_model_version), run.info.run_id)}
    image_bytes = {s["key"]: s["image"] for s in shards}
    assert_rows_match_direct_calls(rows, image_bytes.__getitem__, checkpoint, 0.1, None)
    assert result.manifest["model"]["uri"] == "models:/label-tiny@champion"


def test_the_steady_rate_leaves_the_start_up_out():
    from jobs.label import LabelResult
    from pipelines.labelling.writer import RunCounts

    def result(first_rows_seconds, first_rows, seconds, labelled=90, errors=10):
        return LabelResult(output="out", counts=RunCounts(labelled=labelled, errors=errors), totals={},
                           seconds=seconds, label_run="r", first_rows_seconds=first_rows_seconds, first_rows=first_rows)

    assert result(10.0, 20, 30.0).steady_images_per_s == pytest.approx(80 / 20.0)  # 80 images in the last 20 s
    assert result(10.0, 20, 30.0).images_per_s == pytest.approx(100 / 30.0)
    assert result(10.0, 100, 30.0).steady_images_per_s is None  # everything came with the first rows
    assert result(None, 0, 30.0, 0, 0).steady_images_per_s is None  # nothing labelled
