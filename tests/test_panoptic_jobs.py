"""Panoptic jobs on the real 2-node Ray cluster with a real MLflow server: training the mask head on top of a
detector (detector frozen), `detr evaluate --task panoptic`, and the pyfunc model's segments."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

pytestmark = [pytest.mark.ray, pytest.mark.mlflow]


@pytest.fixture(scope="module")
def panoptic_shapes(tmp_path_factory):
    from jobs.synthetic_data import SyntheticConfig, write_dataset

    out = tmp_path_factory.mktemp("panoptic_shapes")
    config = SyntheticConfig(images=16, classes=2, min_image_size=64, max_image_size=80, max_object_size=32,
                             max_objects=2, val_fraction=0.25, seed=4, panoptic=True, stuff_classes=2)
    return write_dataset(str(out), config)


def test_mask_head_training_evaluation_and_pyfunc(ray_cluster, mlflow_server, panoptic_shapes, tmp_path, monkeypatch):
    import mlflow
    import numpy as np
    from mlflow.tracking import MlflowClient
    from PIL import Image

    from detr import build_model, load_checkpoint, save_checkpoint
    from jobs.evaluate import evaluate, format_result
    from jobs.train import train
    from jobs.train_config import load_train_config
    from pipelines.training.transforms import TransformsConfig
    from query_classes import fit_query_classes

    # A "trained" detector (ours, no masks) to put the mask head on: its queries fitted to the classes 1-2
    # (things) and 3-4 (stuff) on the dataset's images, so the panoptic merge has segments to keep.
    torch.manual_seed(2)
    detector = build_model("tiny_panoptic", num_classes=5, mask_head=None, num_queries=6, enc_layers=1,
                           dim_feedforward=128)
    images = sorted(Path(panoptic_shapes["panoptic_train"]).parent.glob("images/*.png"))
    fit_query_classes(detector, TransformsConfig.small(), (80, 80),
                      [np.asarray(Image.open(p).convert("RGB")) for p in images])
    save_checkpoint(detector, tmp_path / "detector.pt")
    config = load_train_config(None, [
        f"data.train={panoptic_shapes['panoptic_train']}", f"data.val={panoptic_shapes['panoptic_val']}",
        "data.transforms=small", "data.batch_size=2", "model.preset=tiny_panoptic", "model.num_queries=6",
        "model.enc_layers=1", "model.dim_feedforward=128", "scaling.num_workers=2", "schedule.epochs=1",
        "schedule.max_steps_per_epoch=2", "schedule.log_every_steps=1", "schedule.log_images=0",
        f"storage.path={tmp_path / 'ray_results'}", "storage.run_name=masks", f"tracking.uri={mlflow_server}",
        "tracking.experiment=test-panoptic", "tracking.registered_model=shapes-panoptic",
        f"init_from={tmp_path / 'detector.pt'}",
    ])
    result = train(config)

    client = MlflowClient(mlflow_server)
    for key in ("train_loss_mask", "train_loss_dice", "train_loss_ce", "val_PQ", "val_PQ_th", "val_PQ_st", "val_AP"):
        assert client.get_metric_history(result.run_id, key), key
    assert client.get_run(result.run_id).data.params["model.mask_head.freeze_detector"] == "True"
    model, metadata = load_checkpoint(Path(result.checkpoint_dir) / "model.pt")
    assert model.config.masks and model.config.mask_head.freeze_detector
    assert {c["id"]: c["isthing"] for c in metadata["categories"]} == {1: 1, 2: 1, 3: 0, 4: 0}
    # The paper's recipe: the detector is frozen, only the mask head learned.
    state, initial = model.state_dict(), detector.state_dict()
    assert all(torch.equal(state["detr." + k], v) for k, v in initial.items())
    # The mask head trained: out_lay's bias starts at 0 (the official init) and moved.
    assert state["mask_head.out_lay.bias"].abs().item() > 0

    # detr evaluate --task panoptic, on the registered model, logged with its per-class table.
    evaluation = evaluate("models:/shapes-panoptic/1", panoptic_shapes["panoptic_val"], tracking_uri=mlflow_server,
                          experiment="test-panoptic-eval", task="panoptic", panoptic_threshold=0.3)
    for name in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st", "RQ_st", "segm_AP", "segm_AP50"):
        assert name in evaluation.metrics
    assert 0.0 <= evaluation.metrics["PQ"] <= 1.0 and evaluation.images == 4
    run = client.get_run(evaluation.run_id)
    assert run.data.tags["raydetr.task"] == "panoptic"
    assert {a.path for a in client.list_artifacts(evaluation.run_id)} == {"per_class_pq.csv"}
    assert "PQ" in format_result(evaluation)
    again = evaluate("models:/shapes-panoptic/1", panoptic_shapes["panoptic_val"], tracking_uri=mlflow_server,
                     experiment="test-panoptic-eval", task="panoptic", panoptic_threshold=0.3)
    assert again.reused and again.run_id == evaluation.run_id

    # The pyfunc model of a panoptic model returns segments too (loaded from the registry of this test's server).
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)
    pyfunc = mlflow.pyfunc.load_model(result.model_uri)
    image = next(Path(panoptic_shapes["panoptic_val"]).parent.glob("images/*.png"))
    frame = pyfunc.predict(pd.DataFrame({"path": [str(image)]}), params={"panoptic_threshold": 0.0})
    assert frame.loc[0, "error"] == ""
    segments = json.loads(frame.loc[0, "segments"])
    assert segments and {"id", "category_id", "isthing", "area", "score", "rle", "label_name"} <= set(segments[0])
    assert sum(s["area"] for s in segments) == frame.loc[0, "width"] * frame.loc[0, "height"]
    from detr import rle_to_masks

    masks = rle_to_masks([s["rle"] for s in segments])
    assert [int(m.sum()) for m in masks] == [s["area"] for s in segments]
