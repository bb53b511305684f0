"""Evaluation, the model registry and promotion against a real MLflow server and a real Ray cluster.

Two models: an untrained one, registered as version 1, and one the training job
trains with the fast recipe and registers as version 2, so one is clearly better.
Promotion puts the first in place (no holder), moves the alias to the better
one, refuses a candidate that fails the gate, records every decision on the
version, and rollback restores the previous holder. The pyfunc model predicts
on image files and bytes.
"""
from __future__ import annotations

import io
import os

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
    """Large, isolated shapes of two classes: a few minutes of training find them."""
    from jobs.synthetic_data import SyntheticConfig, write_dataset

    out = tmp_path_factory.mktemp("easy-shapes")
    config = SyntheticConfig(images=120, classes=2, min_objects=1, max_objects=1, min_object_size=28,
                             max_object_size=44, min_image_size=64, max_image_size=80, val_fraction=0.2, seed=11)
    return write_dataset(str(out), config)


def _train(easy_shapes, tmp_path, uri, name, overrides):
    from jobs.train import train
    from jobs.train_config import load_train_config

    config = load_train_config(None, [
        f"data.train={easy_shapes['train']}", f"data.val={easy_shapes['val']}", "data.transforms=small",
        "scaling.num_workers=2", f"storage.path={tmp_path / 'ray_results'}", f"storage.run_name={name}",
        f"tracking.uri={uri}", "tracking.experiment=test-registry", f"tracking.registered_model={MODEL}",
        "schedule.log_images=0", *overrides])
    return train(config)


def _register_untrained(easy_shapes, tmp_path, uri) -> str:
    """Version 1: a model that has never trained, with the categories and transforms training would record."""
    import json

    from detr import build_model, save_checkpoint
    from jobs.mlflow_model import log_detector_model
    from jobs.tracking import TrackedRun
    from pipelines.inference.detector import transforms_to_metadata
    from pipelines.training.transforms import TransformsConfig

    with open(easy_shapes["train"]) as f:
        categories = json.load(f)["categories"]
    checkpoint = save_checkpoint(build_model("tiny", num_classes=3), tmp_path / "untrained.pt", metadata={
        "categories": categories, "transforms": transforms_to_metadata(TransformsConfig.small())})
    run = TrackedRun.start(uri, "test-registry", "untrained")
    return log_detector_model(uri, run.run_id, checkpoint, registered_model_name=MODEL).registered_model_version


def test_train_register_promote_gate_and_rollback(ray_cluster, mlflow_server, easy_shapes, tmp_path):
    from mlflow.tracking import MlflowClient

    from jobs.evaluate import evaluate
    from jobs.promote import promote
    from jobs.registry import alias_history
    from jobs.rollback import rollback

    weak = _register_untrained(easy_shapes, tmp_path, mlflow_server)
    # A fixed number of steps, not minutes, so a slower machine gets the same model (AP about 0.03 against
    # the untrained model's 0). One worker leaves a core to the data pipeline; validation only at the end.
    strong = _train(easy_shapes, tmp_path, mlflow_server, "strong",
                    ["recipe=fast", "model.preset=tiny", "schedule.epochs=6", "schedule.eval_every=1000",
                     "data.batch_size=4", "optimizer.warmup_steps=10", "scaling.num_workers=1"])
    assert (weak, strong.registered_version) == ("1", "2")
    client = MlflowClient(mlflow_server)
    assert client.get_model_version(MODEL, "2").tags["raydetr.train_run_id"] == strong.run_id

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
    info = log_detector_model(mlflow_server, run.run_id, checkpoint, registered_model_name="pyfunc-test")
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
    assert set(out["label_names"][0]) <= {"0", "circle", "square"}
