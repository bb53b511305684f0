"""Evaluation, the model registry and promotion against a real MLflow server and a real Ray cluster.

Two models: an untrained one, registered as version 1, and one whose heads are fitted to the
evaluation images' objects, registered as version 2, so one is clearly better. (The training job's
own registration: tests/test_topology_jobs.py and the README's commands, tests/test_readme_commands.py.)
Promotion puts the first in place (no holder), moves the alias to the better
one, refuses a candidate that fails the gate, records every decision on the
version, and rollback restores the previous holder. The pyfunc model predicts
on image files and bytes.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.mlflow]

MODEL = "shapes-registry"


def test_the_gate_decides_on_the_gain():
    from jobs.promote import decide

    assert decide(0.30, None, 0.005, "AP") == (True, "no current holder")
    assert decide(0.306, 0.30, 0.005, "AP")[0] is True
    promoted, reason = decide(0.303, 0.30, 0.005, "AP")
    assert promoted is False and "+0.0030 < 0.0050" in reason


@pytest.fixture(scope="module")
def easy_shapes(tmp_path_factory):
    """Large, isolated shapes of two classes, one per image."""
    from jobs.synthetic_data import SyntheticConfig, write_dataset

    out = tmp_path_factory.mktemp("easy-shapes")
    config = SyntheticConfig(images=120, classes=2, min_objects=1, max_objects=1, min_object_size=28,
                             max_object_size=44, min_image_size=64, max_image_size=80, val_fraction=0.2, seed=11)
    return write_dataset(str(out), config)


def _register(easy_shapes, tmp_path, uri, name: str, fitted: bool) -> str:
    """A version with the categories and transforms training would record: a model that has never trained, or
    one whose heads are fitted to find the validation images' objects (`fit_heads_to_objects`: clearly
    better on them; what is tested here is the registry and the gate, not how well a model generalises)."""
    import json

    import torch
    from PIL import Image

    from detr import build_model, save_checkpoint
    from jobs.mlflow_model import log_detector_model
    from jobs.tracking import TrackedRun
    from pipelines.inference.detector import transforms_to_metadata
    from pipelines.training.transforms import TransformsConfig
    from query_classes import fit_heads_to_objects

    with open(easy_shapes["train"]) as f:
        categories = json.load(f)["categories"]
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=3)
    transforms = TransformsConfig.small()
    if fitted:
        with open(easy_shapes["val"]) as f:
            val = json.load(f)
        first = {}
        for a in val["annotations"]:
            first.setdefault(a["image_id"], a)
        folder = os.path.dirname(easy_shapes["val"])
        images, boxes, classes = [], [], []
        for im in val["images"]:
            x, y, w, h = first[im["id"]]["bbox"]
            images.append(np.asarray(Image.open(os.path.join(folder, im["file_name"])).convert("RGB")))
            boxes.append([(x + w / 2) / im["width"], (y + h / 2) / im["height"], w / im["width"], h / im["height"]])
            classes.append(first[im["id"]]["category_id"])
        fit_heads_to_objects(model.eval(), transforms, images, boxes, classes)
    checkpoint = save_checkpoint(model, tmp_path / f"{name}.pt", metadata={
        "categories": categories, "transforms": transforms_to_metadata(transforms)})
    run = TrackedRun.start(uri, "test-registry", name)
    return log_detector_model(uri, run.run_id, checkpoint, registered_model_name=MODEL).registered_model_version


def test_register_evaluate_promote_gate_and_rollback(ray_cluster, mlflow_server, easy_shapes, tmp_path):
    from mlflow.tracking import MlflowClient

    from detr.errors import RaydetrError
    from jobs.evaluate import evaluate
    from jobs.promote import promote
    from jobs.registry import alias_history
    from jobs.rollback import rollback

    weak = _register(easy_shapes, tmp_path, mlflow_server, "untrained", fitted=False)
    strong = _register(easy_shapes, tmp_path, mlflow_server, "fitted", fitted=True)
    assert (weak, strong) == ("1", "2")
    client = MlflowClient(mlflow_server)

    data = easy_shapes["val"]
    first = promote(MODEL, "1", data, tracking_uri=mlflow_server)
    assert first.promoted and first.reason == "no current holder"
    assert client.get_model_version_by_alias(MODEL, "champion").version == "1"

    dry = promote(MODEL, "2", data, tracking_uri=mlflow_server, dry_run=True)
    assert dry.promoted and client.get_model_version_by_alias(MODEL, "champion").version == "1"
    assert "raydetr.promotion.champion.promoted" not in client.get_model_version(MODEL, "2").tags

    better = promote(MODEL, "2", data, tracking_uri=mlflow_server, min_gain=0.005)
    assert better.promoted, better.describe()
    assert better.candidate_value >= better.holder_value + 0.005
    assert client.get_model_version_by_alias(MODEL, "champion").version == "2"
    tags = client.get_model_version(MODEL, "2").tags
    assert tags["raydetr.promotion.champion.promoted"] == "True"
    assert float(tags["raydetr.promotion.champion.holder_value"]) == pytest.approx(better.holder_value)
    assert tags["raydetr.promotion.champion.dataset_digest"] == better.dataset_digest

    # Evaluations of a version on data with the same digest are reused, not recomputed.
    again = evaluate(f"models:/{MODEL}/2", data, tracking_uri=mlflow_server)
    assert again.reused and again.metrics["AP"] == pytest.approx(better.candidate_value)
    # At another evaluation size it is another evaluation, reused in turn at that size.
    smaller = evaluate(f"models:/{MODEL}/2", data, tracking_uri=mlflow_server, eval_size=96,
                       plots=str(tmp_path / "plots"))
    assert not smaller.reused and (smaller.eval_size, again.eval_size) == ("96x160", "128x213")
    # Its analyses are in the run (and in --plots): the last decoder layer's AP is the evaluation's own.
    logged = {Path(a.path).name for a in client.list_artifacts(smaller.run_id, "analysis")}
    assert logged == {"analysis.json", "per_layer_ap.png", "slot_boxes.png", "slot_boxes.parquet",
                      "missed_by_instance_count.png", "confusion_matrix.png", "worst_images.png"}, logged
    numbers = json.loads((tmp_path / "plots" / "analysis.json").read_text())
    assert len(numbers["per_layer_ap"]) == 2  # the `tiny` preset's two decoder layers
    assert numbers["per_layer_ap"][-1]["AP"] == pytest.approx(smaller.metrics["AP"], abs=1e-6)
    matrix = np.asarray(numbers["confusion_matrix"]["matrix"])
    assert matrix[:-1].sum() == len(json.loads(Path(data).read_text())["annotations"])  # each true box once
    assert client.get_run(smaller.run_id).data.params["eval_size"] == "96x160"
    assert f"raydetr.eval.{smaller.digest[:12]}.96x160.AP" in client.get_model_version(MODEL, "2").tags
    assert evaluate(f"models:/{MODEL}/2", data, tracking_uri=mlflow_server, eval_size=96).run_id == smaller.run_id
    # In another runtime too: the ONNX export in ONNX Runtime scores what PyTorch does, and is reused in turn.
    exported = evaluate(f"models:/{MODEL}/2", data, tracking_uri=mlflow_server, runtime="onnxruntime")
    assert not exported.reused and exported.metrics["AP"] == pytest.approx(again.metrics["AP"], abs=1e-3)
    assert client.get_run(exported.run_id).data.params["runtime"] == "onnxruntime"
    assert "per_layer_ap" in exported.analysis["skipped"]  # the exported graph gives the last layer only
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}))
    with pytest.raises(RaydetrError, match="the evaluation set holds no image"):
        evaluate(f"models:/{MODEL}/2", str(empty), tracking_uri=mlflow_server)
    assert f"raydetr.eval.{exported.digest[:12]}.onnxruntime.AP" in client.get_model_version(MODEL, "2").tags
    assert evaluate(f"models:/{MODEL}/2", data, tracking_uri=mlflow_server, runtime="onnxruntime").reused

    # The weak model fails the gate against the strong champion: the alias stays.
    refused = promote(MODEL, "1", data, tracking_uri=mlflow_server, min_gain=0.005)
    assert not refused.promoted and client.get_model_version_by_alias(MODEL, "champion").version == "2"
    assert client.get_model_version(MODEL, "1").tags["raydetr.promotion.champion.promoted"] == "False"

    assert alias_history(client, MODEL, "champion") == ["1", "2"]
    assert rollback(MODEL, "champion", mlflow_server) == ("2", "1")
    assert client.get_model_version_by_alias(MODEL, "champion").version == "1"
    with pytest.raises(ValueError, match="no previous holder"):
        rollback(MODEL, "champion", mlflow_server)


def test_the_pyfunc_model_predicts_on_paths_and_bytes(mlflow_server, tmp_path, monkeypatch):
    import mlflow
    from PIL import Image

    from detr import build_model, save_checkpoint
    from jobs.mlflow_model import log_detector_model
    from jobs.tracking import TrackedRun
    from pipelines.inference.detector import Detector

    model = build_model("tiny", num_classes=3)
    checkpoint = save_checkpoint(model, tmp_path / "model.pt",
                                 metadata={"categories": [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}]})
    run = TrackedRun.start(mlflow_server, "test-pyfunc")
    info = log_detector_model(mlflow_server, run.run_id, checkpoint, registered_model_name="pyfunc-test",
                              exports=("onnx",))
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    buf = io.BytesIO()
    Image.fromarray(pixels[:40]).save(buf, "JPEG")

    # This process's MLflow default, set so that the test's end restores it (mlflow.set_tracking_uri would also
    # write MLFLOW_TRACKING_URI into the environment every later job of the session inherits).
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)
    loaded = mlflow.pyfunc.load_model(f"models:/pyfunc-test/{info.registered_model_version}")
    assert loaded.metadata.signature is not None and loaded.metadata.saved_input_example_info is not None
    frame = pd.DataFrame({"path": [str(tmp_path / "a.png"), None, str(tmp_path / "missing.png")],
                          "image": [None, buf.getvalue(), None]})
    out = loaded.predict(frame, params={"score_threshold": 0.0, "top_k": 5})
    assert list(out["width"][:2]) == [80, 80] and list(out["height"][:2]) == [60, 40]
    assert out["error"][0] == "" and out["error"][1] == "" and "missing.png" in out["error"][2]
    params = {p.name: p.default for p in loaded.metadata.signature.params.params}
    assert (params["eval_size"], params["eval_max_size"]) == (800, 0)  # the model's own size (the paper's)
    smaller = loaded.predict(frame[:1], params={"score_threshold": 0.0, "top_k": 5, "eval_size": 32})
    # In ONNX Runtime (the export logged beside the weights, checked against PyTorch when it was logged): the same
    # detections (matched one to one: a random model's scores nearly tie, and their order may differ with rounding).
    assert loaded.unwrap_python_model().export_folders.keys() == {"onnx"}
    from scipy.optimize import linear_sum_assignment

    exported = loaded.predict(frame[:1], params={"score_threshold": 0.0, "top_k": 5, "runtime": "onnxruntime"})
    ours, theirs = (np.array(list(f["boxes"][0]), dtype=float) for f in (exported, out))
    rows, cols = linear_sum_assignment(np.abs(ours[:, None] - theirs[None]).sum(-1))
    np.testing.assert_allclose(ours[rows], theirs[cols], atol=1e-3)
    np.testing.assert_allclose(sorted(exported["scores"][0]), sorted(out["scores"][0]), atol=1e-4)
    # A job that loads a registered model downloads it to a temporary folder, and removes it, also when the
    # download fails.
    import tempfile

    from jobs.model_sources import load_model

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    # The tracking URI given to the job is the registry it asks, whatever this process's MLflow defaults are, and
    # asking it changes none of them (a child process would inherit them: the production topology's jobs did).
    elsewhere = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", elsewhere)
    assert load_model(f"models:/pyfunc-test/{info.registered_model_version}", mlflow_server).checkpoint
    assert (os.environ["MLFLOW_REGISTRY_URI"], mlflow.get_registry_uri()) == (elsewhere, elsewhere)
    with pytest.raises(ValueError, match="model 'models:/pyfunc-test/99' is not in the registry at http"):
        load_model("models:/pyfunc-test/99", mlflow_server)  # one line at the command line, not a traceback
    assert list((tmp_path / "tmp").glob("raydetr-model-*")) == []
    expected = Detector.from_checkpoint(str(checkpoint)).detect([pixels])[0]
    order = expected["scores"].argsort(descending=True)[:5]
    np.testing.assert_allclose(np.array(list(out["boxes"][0]), dtype=float), expected["boxes"][order].numpy(), atol=1e-3)
    # At another evaluation size: the same model, preprocessed as a Detector at that size.
    import dataclasses

    detector = Detector.from_checkpoint(str(checkpoint))
    at_32 = dataclasses.replace(detector, transforms=detector.transforms.at_eval_size(32)).detect([pixels])[0]
    order = at_32["scores"].argsort(descending=True)[:5]
    np.testing.assert_allclose(np.array(list(smaller["boxes"][0]), dtype=float), at_32["boxes"][order].numpy(),
                               atol=1e-3)
    assert not np.allclose(np.array(list(smaller["boxes"][0]), dtype=float), expected["boxes"][order].numpy(),
                           atol=1e-3)
    assert set(out["label_names"][0]) <= {"0", "circle", "square"}
