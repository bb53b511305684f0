"""The training job on a real 2-node Ray cluster with a real MLflow server (SQLite backend).

Two workers train `tiny` for a few steps; params, metrics, artifacts and the
model land in MLflow; the checkpoint restores; a worker killed mid-run is
replaced and the job resumes from its checkpoint with one continuous MLflow
history; and two workers with half a batch each compute the loss and gradients
of one worker with the whole batch.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.ray, pytest.mark.mlflow]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from jobs.synthetic_data import SyntheticConfig, write_dataset

    out = tmp_path_factory.mktemp("shapes")
    config = SyntheticConfig(images=32, classes=3, min_image_size=64, max_image_size=96, max_object_size=40,
                             val_fraction=0.25, seed=3)
    return write_dataset(str(out), config)


def job_config(shapes, tmp_path, tracking_uri, **schedule):
    from jobs.train_config import load_train_config

    overrides = [
        f"data.train={shapes['train']}", f"data.val={shapes['val']}", "data.transforms=small", "data.batch_size=2",
        "model.preset=tiny", "model.num_queries=8", "scaling.num_workers=2",
        f"storage.path={tmp_path / 'ray_results'}", "storage.run_name=tiny-run", f"tracking.uri={tracking_uri}",
        "tracking.experiment=test-train", "schedule.log_every_steps=1",
    ] + [f"schedule.{k}={v}" for k, v in schedule.items()]
    return load_train_config(None, overrides)


def metric_steps(client, run_id, key):
    return [m.step for m in client.get_metric_history(run_id, key)]


def test_two_worker_training_is_tracked_in_mlflow_and_its_checkpoint_restores(
        ray_cluster, mlflow_server, shapes, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    # Fine-tune from a COCO-sized checkpoint in the official release layout: the class head is replaced.
    from detr import build_model, load_checkpoint, official_state_dict
    from jobs.train import train

    torch.manual_seed(1)
    official = build_model("tiny", num_classes=91, num_queries=8)
    torch.save({"model": official_state_dict(official)}, tmp_path / "official.pth")
    config = job_config(shapes, tmp_path, mlflow_server, epochs=2, max_steps_per_epoch=2, log_images=2)
    config = dataclasses.replace(config, init_from=str(tmp_path / "official.pth"),
                                 tracking=dataclasses.replace(config.tracking, registered_model="shapes-tiny"),
                                 optimizer=dataclasses.replace(config.optimizer, ema_decay=0.5))
    result = train(config)
    # Rank 0's progress lines reach the driver: one per log_every_steps (1) steps and one per epoch.
    printed = capsys.readouterr().out
    steps = [line for line in printed.splitlines() if line.startswith("epoch ") and "  step " in line]
    assert [line.split("  ")[1] for line in steps] == ["step 1", "step 2", "step 3", "step 4"], printed
    assert all(" images/s" in line and " left" in line for line in steps)  # 2 steps an epoch: the time left is known
    assert "epoch 2/2 done  loss " in printed and "  AP " in printed and "  0s left" in printed

    client = MlflowClient(mlflow_server)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["job.data.train"] == shapes["train"] and params["model.hidden_dim"] == "64"
    assert params["model.num_classes"] == "4" and params["job.scaling.num_workers"] == "2"
    assert metric_steps(client, result.run_id, "epoch") == [0, 1]
    assert metric_steps(client, result.run_id, "train_loss") == [1, 2, 3, 4]  # 2 epochs x 2 steps
    for key in ("train_loss_ce", "train_loss_bbox", "train_loss_giou", "train_class_error", "lr_transformer",
                "lr_backbone", "train_images_per_s", "val_AP", "val_AP50", "val_AP75"):
        assert client.get_metric_history(result.run_id, key), key
    assert run.data.metrics["train_images"] == 8  # 2 steps x 2 workers x 2 images
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert "train_config.yaml" in artifacts
    assert len(client.list_artifacts(result.run_id, "detections")) == 2
    assert result.registered_version == "1"
    version = client.get_model_version("shapes-tiny", "1")
    assert version.run_id == result.run_id and version.tags["raydetr.train_run_id"] == result.run_id

    model, metadata = load_checkpoint(Path(result.checkpoint_dir) / "model.pt")
    assert model.config.num_queries == 8 and model.config.num_classes == 4
    # The stem never trains, so it still holds the initial weights; the class head was rebuilt for 3 ids.
    assert torch.equal(model.backbone.body.conv1.weight, official.backbone.body.conv1.weight)
    assert model.class_embed.weight.shape == (5, 64)
    assert [c["id"] for c in metadata["categories"]] == [1, 2, 3]
    assert metadata["mlflow_run_id"] == result.run_id
    # With ema_decay, model.pt holds the weights' average (what was validated and registered) and the
    # state file the weights as trained, from which training resumes.
    state = torch.load(Path(result.checkpoint_dir) / "train_state.pt", map_location="cpu", weights_only=True)
    assert metadata["ema_decay"] == 0.5 and state["ema_updates"] == 2 * (metadata["epoch"] + 1)  # 2 steps an epoch
    trained = state["trained_model"]
    assert not torch.allclose(trained["class_embed.weight"], model.class_embed.weight)
    assert torch.equal(trained["backbone.body.conv1.weight"], model.backbone.body.conv1.weight)

    # Re-running the same job for one more epoch resumes its checkpoint and MLflow run.
    longer = dataclasses.replace(config, schedule=dataclasses.replace(config.schedule, epochs=3))
    resumed = train(longer)
    assert resumed.run_id == result.run_id
    assert "resumed from the checkpoint after epoch 2 (step 4)" in capsys.readouterr().out
    assert metric_steps(client, result.run_id, "epoch") == [0, 1, 2]
    assert metric_steps(client, result.run_id, "train_loss") == [1, 2, 3, 4, 5, 6]
    # The average goes on from the checkpoint's: the third epoch's checkpoint counts 6 updates.
    states = [torch.load(d / "train_state.pt", map_location="cpu", weights_only=True)
              for d in Path(resumed.checkpoint_dir).parent.glob("checkpoint_*") if d.is_dir()]
    assert {s["epoch"]: s["ema_updates"] for s in states}[3] == 6
    assert resumed.model_uri == f"models:/shapes-tiny/{resumed.registered_version}"
    # Re-running the finished run resumes nothing and registers nothing again.
    again = train(longer)
    assert (again.run_id, again.registered_version, again.checkpoint_dir) == (
        resumed.run_id, resumed.registered_version, resumed.checkpoint_dir)
    assert sorted(int(v.version) for v in client.search_model_versions("name='shapes-tiny'")) == [1, 2]


# A worker killed mid-run, replaced, resuming from its checkpoint with one MLflow history: on the production
# topology, with the checkpoint on S3 and the worker on a node of its own (tests/test_topology_jobs.py).


def _equivalence_worker(config):
    import ray.train
    import ray.train.torch

    from detr import SetCriterion, build_model, pad_images
    from detr.checkpoint import unwrap_model

    rank = ray.train.get_context().get_world_rank()
    world = ray.train.get_context().get_world_size()
    images, targets = config["images"], config["targets"]
    per = len(images) // world
    torch.manual_seed(0)
    model = ray.train.torch.prepare_model(build_model("tiny", num_classes=5, dropout=0.0).train())
    criterion = SetCriterion.from_config(unwrap_model(model).config)
    losses = criterion(model(*pad_images(images[rank * per:(rank + 1) * per])), targets[rank * per:(rank + 1) * per])
    total = criterion.total(losses)
    total.backward()
    grads = {n: p.grad for n, p in unwrap_model(model).named_parameters() if p.grad is not None}
    torch.save({"total": total.detach(), "grads": grads}, os.path.join(config["out"], f"rank{rank}.pt"))


def test_two_workers_with_half_batches_match_one_worker_with_the_whole_batch(ray_cluster, tmp_path):
    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from detr import SetCriterion, build_model, pad_images

    g = torch.Generator().manual_seed(5)
    images = [torch.randn(3, h, w, generator=g) for h, w in [(64, 80), (72, 64), (80, 72), (64, 64)]]
    counts = [3, 0, 1, 2]
    targets = [{"labels": torch.randint(1, 5, (n,), generator=g),
                "boxes": torch.cat([torch.rand(n, 2, generator=g) * 0.5 + 0.25,
                                    torch.rand(n, 2, generator=g) * 0.3 + 0.1], 1)} for n in counts]
    torch.manual_seed(0)
    single = build_model("tiny", num_classes=5, dropout=0.0).train()
    criterion = SetCriterion.from_config(single.config)
    total = criterion.total(criterion(single(*pad_images(images)), targets))
    total.backward()

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    out = tmp_path / "equivalence"
    out.mkdir()
    TorchTrainer(
        _equivalence_worker,
        train_loop_config={"images": images, "targets": targets, "out": str(out)},
        scaling_config=ScalingConfig(num_workers=2),
        run_config=RunConfig(name="equivalence", storage_path=str(tmp_path / "ray_results")),
    ).fit()
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert torch.stack([r["total"] for r in ranks]).mean().item() == pytest.approx(total.item(), rel=1e-5)
    for name, param in single.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(ranks[0]["grads"][name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_tracking_server_that_is_down_fails_the_job_at_once(shapes, tmp_path, monkeypatch):
    import socket

    import jobs.train
    from jobs.tracking import TrackingUnavailableError
    from jobs.train import train

    def too_late(*args, **kwargs):
        raise AssertionError("the job went on to start Ray or build its datasets before checking the tracking server")

    # Opening the sources comes first (a missing file is one line at once); Ray and the data pipeline after.
    monkeypatch.setattr(jobs.train, "connect", too_late)
    monkeypatch.setattr("pipelines.training.dataset.build_detection_dataset", too_late)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = job_config(shapes, tmp_path, f"http://127.0.0.1:{port}", epochs=1)
    with pytest.raises(TrackingUnavailableError, match=f"127.0.0.1:{port}.*not reachable"):
        train(config)
    assert not (tmp_path / "ray_results").exists()


def test_more_workers_than_the_cluster_has_cpus_fail_at_once_with_the_numbers(ray_cluster, shapes, tmp_path):
    """Two workers on a 2-core machine used to take both CPUs and leave Ray Data waiting forever."""
    from detr.errors import RaydetrError
    from jobs.train import check_training_fits, train

    config = dataclasses.replace(job_config(shapes, tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}"),
                                 scaling=dataclasses.replace(job_config(shapes, tmp_path, "x").scaling, num_workers=4))
    with pytest.raises(RaydetrError, match=r"4 training workers x 1 CPUs, plus 1 for the data pipeline, need 5 CPUs; "
                                           r"the cluster has 4\. Set scaling.num_workers to at most 3"):
        train(config)  # the session's cluster: two nodes of 2 CPUs
    check_training_fits(config.scaling, 5.0)
