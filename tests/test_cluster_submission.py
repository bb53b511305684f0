"""End to end on a cluster started the way users start one: `cluster/local_cluster.sh` (ray start: a
head and a worker node), `cluster/mlflow_server.sh` (MLflow with SQLite), then `detr submit` of a
training job and of a labelling job that uses the model training registered.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.mlflow]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp_path: Path, cluster_dir: str) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    env["RAY_AUTH_MODE"] = "token"
    env["RAYDETR_CLUSTER_DIR"] = cluster_dir  # short: Ray's socket paths must stay under 107 bytes
    env["RAYDETR_MLFLOW_DIR"] = str(tmp_path / "mlflow")
    env.pop("RAY_ADDRESS", None)
    return env


def _run(command: list[str], env: dict, timeout: int = 600) -> str:
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout


@pytest.fixture
def cluster_and_server(tmp_path):
    cluster_dir = tempfile.mkdtemp(prefix="rd-", dir="/tmp")
    env = _env(tmp_path, cluster_dir)
    gcs_port, dashboard_port, mlflow_port = _free_port(), _free_port(), _free_port()
    started = []
    try:
        _run(["bash", "cluster/mlflow_server.sh", "start", "--port", str(mlflow_port)], env)
        started.append("mlflow")
        _run(["bash", "cluster/local_cluster.sh", "start", "--workers", "1", "--cpus-per-node", "2",
              "--port", str(gcs_port), "--dashboard-port", str(dashboard_port)], env)
        started.append("ray")
        yield env, f"http://127.0.0.1:{dashboard_port}", f"http://127.0.0.1:{mlflow_port}"
    finally:
        if "ray" in started:
            subprocess.run(["bash", "cluster/local_cluster.sh", "stop"], env=env, cwd=ROOT, capture_output=True)
        if "mlflow" in started:
            subprocess.run(["bash", "cluster/mlflow_server.sh", "stop"], env=env, cwd=ROOT, capture_output=True)
        shutil.rmtree(cluster_dir, ignore_errors=True)


def test_submit_training_then_labelling_to_a_local_multi_node_cluster(cluster_and_server, tmp_path):
    from mlflow.tracking import MlflowClient

    from pipelines.labelling.output import LabelOutput
    from pipelines.synthetic import SyntheticConfig, write_dataset

    env, address, tracking = cluster_and_server
    status = _run([str(BIN / "ray"), "status", "--address", (Path(env["RAYDETR_CLUSTER_DIR"]) / "address").read_text().strip()],
                  env)
    assert status.count("node_") >= 2  # a head and a worker node

    paths = write_dataset(str(tmp_path / "data"), SyntheticConfig(images=24, classes=2, min_image_size=64,
                                                                  max_image_size=80, max_object_size=40,
                                                                  val_fraction=0.25, seed=5))
    config = tmp_path / "train.yaml"
    config.write_text(
        f"data: {{train: {paths['train']}, val: {paths['val']}, transforms: small, batch_size: 2}}\n"
        "model: {preset: tiny, num_queries: 8}\n"
        "schedule: {epochs: 1, max_steps_per_epoch: 2, log_images: 0}\n"
        "scaling: {num_workers: 2}\n"
        f"storage: {{path: {tmp_path / 'ray_results'}, run_name: submitted}}\n"
        "tracking: {experiment: submitted, registered_model: submitted-model}\n")

    out = _run([str(BIN / "detr"), "submit", "train", "--address", address, "--tracking-uri", tracking, "--wait",
                "--no-requirements", "--", "--config", str(config)], env, timeout=900)
    assert "SUCCEEDED" in out.splitlines()[-1], out[-3000:]
    job_ids = [line.split()[3] for line in out.splitlines() if line.startswith("submitted train job")]
    listing = _run([str(BIN / "detr"), "jobs", "list", "--address", address], env)
    assert job_ids[0] in listing and "SUCCEEDED" in listing

    client = MlflowClient(tracking)
    version = client.get_model_version("submitted-model", "1")
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED" and run.data.params["job.scaling.num_workers"] == "2"

    labels = tmp_path / "labels"
    out = _run([str(BIN / "detr"), "submit", "label", "--address", address, "--tracking-uri", tracking, "--wait",
                "--no-requirements", "--", "--model", "models:/submitted-model/1",
                "--input", str(Path(paths["train"]).parent / "images"), "--output", str(labels)], env, timeout=900)
    assert "SUCCEEDED" in out.splitlines()[-1], out[-3000:]
    table = LabelOutput(str(labels)).read("labels").to_pylist()
    assert len(table) == 24 and len({row["key"] for row in table}) == 24
    assert {row["model_version"] for row in table} == {"1"} and {row["model_name"] for row in table} == \
        {"submitted-model"}
    assert all(row["model_run_id"] == version.run_id for row in table)
    json.dumps(table[0], default=str)
