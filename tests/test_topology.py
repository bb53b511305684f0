"""The production topology itself: nodes that share no disk, S3 with real credentials, MLflow on PostgreSQL."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from topology import HEAD_RESOURCE, ISOLATED_RESOURCE

pytestmark = [pytest.mark.topology, pytest.mark.ray, pytest.mark.mlflow]

SEES = f"""
import json, os, sys, ray
ray.init(logging_level="warning")
@ray.remote(num_cpus=0)
def sees(path):
    return os.path.exists(path)
path = sys.argv[1]
print(json.dumps({{name: ray.get(sees.options(resources={{name: 0.01}}).remote(path))
                  for name in ("{HEAD_RESOURCE}", "{ISOLATED_RESOURCE}")}}))
"""


def test_the_worker_node_cannot_see_the_drivers_files(topology, tmp_path):
    secret = tmp_path / "only-on-the-driver.txt"
    secret.write_text("x")
    downloaded = topology.driver_tmp / "a-download"
    downloaded.write_text("x")
    for path in (secret, downloaded):
        done = subprocess.run([sys.executable, "-c", SEES, str(path)], env=topology.env(), capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        assert json.loads(done.stdout.strip().splitlines()[-1]) == {HEAD_RESOURCE: True, ISOLATED_RESOURCE: False}


def test_s3_refuses_wrong_credentials_and_mlflow_keeps_artifacts_on_s3(topology):
    import boto3
    from botocore.exceptions import ClientError
    from mlflow.tracking import MlflowClient

    wrong = boto3.client("s3", endpoint_url=topology.s3.endpoint, region_name="us-east-1",
                         aws_access_key_id=topology.s3.credentials["AWS_ACCESS_KEY_ID"], aws_secret_access_key="wrong")
    with pytest.raises(ClientError):
        wrong.list_objects_v2(Bucket="raydetr-tests")
    client = MlflowClient(topology.tracking_uri)
    experiment = client.create_experiment("topology-check")
    run = client.create_run(experiment)
    path = topology.driver_tmp / "note.txt"
    path.write_text("on s3")
    client.log_artifact(run.info.run_id, str(path))
    assert any(k.endswith(f"{run.info.run_id}/artifacts/note.txt") for k in topology.s3.keys("s3://raydetr-mlflow/"))
    assert (topology.mlflow.state_dir / "postgres" / "data" / "PG_VERSION").exists()


def test_local_inputs_are_read_on_the_drivers_node_and_labelled_on_every_node(topology, tmp_path):
    """A local folder and a local model, on a cluster where one node cannot see them: the folder is read by
    tasks on the driver's node and the bytes travel on through Ray, so no image becomes a read error."""
    import detr
    from jobs.synthetic_data import SyntheticConfig, write_dataset
    from pipelines.inference.detector import transforms_to_metadata
    from pipelines.labelling.output import LabelOutput
    from pipelines.training.transforms import TransformsConfig

    write_dataset(str(tmp_path / "data"), SyntheticConfig(images=12, classes=2, min_image_size=64, max_image_size=64,
                                                          val_fraction=0.0, seed=4))
    model = tmp_path / "tiny.pt"
    detr.save_checkpoint(detr.build_model("tiny", num_classes=3, num_queries=5).eval(), model,
                         {"categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
                          "transforms": transforms_to_metadata(TransformsConfig.small())})
    out = tmp_path / "labels"
    topology.detr("label", "--model", str(model), "--input", str(tmp_path / "data" / "images"), "--output", str(out),
                  "--concurrency", "2", "--cpus-per-actor", "1", "--batch-size", "1")  # one actor per node
    output = LabelOutput(str(out))
    assert len(output.read("labels")) == 12 and len(output.read("errors")) == 0
    assert any("LabelPredictor" in name for name in topology.actor_classes_on_isolated_node())


def test_a_local_storage_path_that_a_node_cannot_see_is_refused_before_training(topology, tmp_path):
    from jobs.synthetic_data import SyntheticConfig, write_dataset

    data = write_dataset(str(tmp_path / "data"), SyntheticConfig(images=4, classes=2, val_fraction=0.0, seed=4))
    config = tmp_path / "train.yaml"
    config.write_text(f"data: {{train: {data['train']}}}\nmodel: {{preset: tiny}}\n"
                      f"storage: {{path: {tmp_path / 'runs'}}}\n")
    (tmp_path / "runs").mkdir()
    done = topology.detr("train", "--config", str(config), check=False)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert f"storage.path {tmp_path / 'runs'} is a folder that 1 of the cluster's nodes cannot see" in last
