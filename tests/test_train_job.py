"""The training job's checks before it starts anything: a tracking server that is down, more workers than
the cluster has CPUs.

The job itself runs where its users run it: two workers on the production topology (tests/test_topology_jobs.py:
fine-tuned from a checkpoint of another class count, params, metrics, artifacts and the checkpoint on S3, a killed worker, a
re-run that resumes, a finished run re-run), the README's two trainings (tests/test_readme_commands.py: one
and two workers, what the command prints), and a panoptic model (tests/test_panoptic_jobs.py). Two DDP workers
with half a batch each compute one worker's loss and gradients: tests/test_distributed_loss.py.
"""
from __future__ import annotations

import dataclasses

import pytest

pytestmark = [pytest.mark.ray]


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
