"""The cluster scripts as users run them: `cluster/local_cluster.sh` (ray start: a head and a worker node)
and `cluster/mlflow_server.sh --auth` (MLflow with SQLite and its basic-auth app), started, checked and
stopped; two `detr submit` jobs at once with the pinned requirements, as a first submission is."""
from __future__ import annotations

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
    # Both at once, as two terminals would (each waits for its own service to answer).
    starts = {
        "mlflow": ["bash", "cluster/mlflow_server.sh", "start", "--port", str(mlflow_port), "--auth"],
        # Ports of its own, as a second cluster on a machine needs (the session's cluster runs beside it).
        "ray": ["bash", "cluster/local_cluster.sh", "start", "--workers", "1", "--cpus-per-node", "2", "--port",
                str(gcs_port), "--dashboard-port", str(dashboard_port), "--client-port", str(_free_port()),
                "--agent-port", str(_free_port())],
    }
    running = {name: subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True) for name, command in starts.items()}
    try:
        printed = {name: process.communicate(timeout=600)[0] for name, process in running.items()}
        for name, process in running.items():
            assert process.returncode == 0, f"{starts[name]} failed:\n{printed[name][-4000:]}"
        yield env, f"http://127.0.0.1:{dashboard_port}", f"http://127.0.0.1:{mlflow_port}"
    finally:
        for process in running.values():
            if process.poll() is None:
                process.kill()
        subprocess.run(["bash", "cluster/local_cluster.sh", "stop"], env=env, cwd=ROOT, capture_output=True)
        subprocess.run(["bash", "cluster/mlflow_server.sh", "stop"], env=env, cwd=ROOT, capture_output=True)
        shutil.rmtree(cluster_dir, ignore_errors=True)


def test_local_cluster_and_tracking_server_start_and_stop_only_themselves(cluster_and_server, ray_cluster, monkeypatch,
                                                                         tmp_path):
    """`detr submit` of training and labelling runs on the production topology (tests/test_topology_jobs.py);
    here the scripts themselves: nodes with folders of their own, and a stop that leaves other clusters alone."""
    import ray
    import requests

    env, address, tracking = cluster_and_server
    gcs = (Path(env["RAYDETR_CLUSTER_DIR"]) / "address").read_text().strip()
    status = _run([str(BIN / "ray"), "status", "--address", gcs], env)
    assert status.count("node_") >= 2  # a head and a worker node
    root = Path(env["RAYDETR_CLUSTER_DIR"]) / "ray"
    assert (root.parent / "ray-worker-1").is_dir()  # the worker node's own sessions and runtime environments
    assert requests.get(f"{tracking}/health", timeout=10).status_code == 200
    # A team server is closed: a job without credentials stops at once with one line that says what to set. The
    # three refusals run at once (each is a fresh `detr` process).
    anonymous = {k: v for k, v in env.items() if not k.startswith("MLFLOW_TRACKING_")}
    password_file = Path(env["RAYDETR_MLFLOW_DIR"]) / "auth" / "admin_password"
    assert oct(password_file.stat().st_mode & 0o777) == "0o600"
    admin = {**anonymous, "MLFLOW_TRACKING_USERNAME": "admin",
             "MLFLOW_TRACKING_PASSWORD": password_file.read_text().strip()}
    rollback = [sys.executable, "-m", "jobs.cli", "rollback", "--name", "m", "--tracking-uri", tracking]
    calls = {"refused": (rollback, anonymous), "wrong": (rollback, {**admin, "MLFLOW_TRACKING_PASSWORD": "guess"}),
             "unknown": ([sys.executable, "-m", "jobs.cli", "jobs", "logs", "nonexistent", "--address", address], env)}
    running = {name: subprocess.Popen(command, env=call_env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True) for name, (command, call_env) in calls.items()}
    done = {name: (process.communicate(timeout=120)[1].strip(), process.returncode)
            for name, process in running.items()}
    assert done["refused"] == (
        f"detr rollback: error: MLflow tracking server {tracking} needs credentials: set MLFLOW_TRACKING_USERNAME "
        "and MLFLOW_TRACKING_PASSWORD in the job's environment (never in a config or on the command line)", 1)
    assert "refused the password of user 'admin'" in done["wrong"][0]
    assert done["unknown"] == (
        f"detr jobs: error: no job 'nonexistent' on the cluster at {address} (`detr jobs list` shows its jobs)", 1)
    from mlflow.tracking import MlflowClient

    from jobs.tracking import ensure_tracking_available

    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, admin[name])
    ensure_tracking_available(tracking)
    experiment = MlflowClient(tracking).create_experiment("with-credentials")
    assert MlflowClient(tracking).get_experiment(experiment).name == "with-credentials"
    assert requests.get(f"{address}/api/version", timeout=10).status_code in (200, 401)

    # Two submissions at once with the pinned requirements: every node builds the job's pip environment, each in
    # a folder of its own (nodes sharing one raced, and a first submission failed with `No module named 'ray'`).
    from jobs.synthetic_data import SyntheticConfig, write_dataset

    data = write_dataset(str(tmp_path / "shapes"), SyntheticConfig(images=6, val_fraction=0.0, seed=2))
    submissions = [subprocess.Popen([str(BIN / "detr"), "submit", "ingest", "--address", address, "--wait", "--",
                                     data["train"], str(tmp_path / f"ingested-{i}")], env=env, cwd=ROOT,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    for submission in submissions:
        printed = submission.communicate(timeout=600)[0]
        assert submission.returncode == 0 and printed.strip().endswith("SUCCEEDED"), printed[-3000:]
    environments = [sorted(node.glob("session_latest/runtime_resources/pip/*")) for node in (root, root.parent /
                                                                                           "ray-worker-1")]
    assert [len(e) for e in environments] == [1, 1], environments  # one environment per node, in its own folder
    assert all((tmp_path / f"ingested-{i}" / "manifest.json").is_file() for i in range(2))

    _run(["bash", "cluster/local_cluster.sh", "stop"], env)
    left = subprocess.run(["pgrep", "-f", str(root)], capture_output=True, text=True).stdout.split()
    assert left == []
    assert ray.get(ray.remote(lambda: 1).remote()) == 1  # the session's own cluster still runs
