"""The cluster configurations parse and carry the fields their tools require."""
from __future__ import annotations

import importlib
import json
import shlex
import subprocess
from pathlib import Path

import pytest
import ray
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


def test_cluster_launcher_config_passes_rays_own_schema():
    import jsonschema

    config = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    assert config["head_node_type"] in config["available_node_types"]
    gpu_types = [t for t in config["available_node_types"].values() if t.get("resources", {}).get("GPU", 0) > 0]
    assert gpu_types and all(t["max_workers"] <= config["max_workers"] for t in gpu_types)
    assert config["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}")
    assert any("--dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"])
    assert_launcher_closed(config)


def assert_launcher_closed(config: dict) -> None:
    """Every node starts Ray with token authentication, with the token shipped over SSH, never inline."""
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in config[key]
              if "ray start" in c]
    assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), starts
    assert "~/.ray/auth_token" in (config.get("file_mounts") or {}), "no token shipped to the nodes"
    assert not any("RAY_AUTH_TOKEN=" in c for key in config if key.endswith("_commands") for c in config[key])


def assert_kuberay_closed(spec: dict) -> None:
    assert (spec.get("authOptions") or {}).get("mode") == "token", "Ray token authentication is off"


def test_a_config_without_token_authentication_is_caught():
    config = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    open_launcher = dict(config, head_start_ray_commands=[c.replace("export RAY_AUTH_MODE=token; ", "")
                                                          for c in config["head_start_ray_commands"]])
    with pytest.raises(AssertionError):
        assert_launcher_closed(open_launcher)
    with pytest.raises(AssertionError):
        assert_launcher_closed(dict(config, file_mounts={}))
    spec = _cluster_spec(next(d for _, d in kuberay_documents() if d["kind"] == "RayCluster"))
    with pytest.raises(AssertionError, match="token authentication is off"):
        assert_kuberay_closed({k: v for k, v in spec.items() if k != "authOptions"})


def kuberay_documents():
    docs = []
    for path in sorted((CLUSTER / "kuberay").glob("*.yaml")):
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _cluster_spec(doc):
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


@pytest.mark.parametrize("name, doc", [(n, d) for n, d in kuberay_documents() if d["kind"] in ("RayCluster", "RayJob")],
                         ids=lambda v: v if isinstance(v, str) else v["metadata"]["name"])
def test_kuberay_manifests_name_the_projects_ray_version_and_gpus(name, doc):
    assert doc["apiVersion"] == "ray.io/v1" and doc["metadata"]["name"]
    spec = _cluster_spec(doc)
    assert spec["rayVersion"] == ray.__version__
    assert_kuberay_closed(spec)
    head = spec["headGroupSpec"]
    containers = head["template"]["spec"]["containers"] + [
        c for group in spec["workerGroupSpecs"] for c in group["template"]["spec"]["containers"]]
    assert all(c["image"].startswith(f"rayproject/ray:{ray.__version__}") for c in containers)
    # Nodes share no disk: every node reaches the object store, with credentials from a Secret, never inline.
    assert all({"secretRef": {"name": "raydetr-object-store"}} in c.get("envFrom", []) for c in containers)
    assert not [e for c in containers for e in c.get("env", []) if e["name"].startswith("AWS_") and "value" in e]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu = groups["gpu"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) == 1
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]


@pytest.mark.parametrize("name, doc", [(n, d) for n, d in kuberay_documents() if d["kind"] == "RayJob"],
                         ids=lambda v: v if isinstance(v, str) else v["metadata"]["name"])
def test_rayjob_entrypoints_are_valid_job_commands(name, doc, tmp_path):
    words = shlex.split(doc["spec"]["entrypoint"])
    assert words[:2] == ["python", "-m"] and words[2].startswith("jobs.")
    module = importlib.import_module(words[2])
    import argparse

    parser = argparse.ArgumentParser()
    module.configure_parser(parser)
    args = parser.parse_args(words[3:])
    env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    assert env["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http")
    from jobs.submit import pinned_requirements

    pins = {p.split("==")[0]: p for p in pinned_requirements()}
    for package in env["pip"]["packages"]:
        assert package == pins[package.split("==")[0]], package
    if getattr(args, "config", None):
        (config_map,) = [d for n, d in kuberay_documents() if n == name and d["kind"] == "ConfigMap"]
        config_file = tmp_path / Path(args.config).name
        config_file.write_text(config_map["data"][Path(args.config).name])
        from jobs.train_config import load_train_config

        config = load_train_config(config_file)
        assert config.storage.path.startswith("s3://") and config.scaling.num_workers == \
            doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"]


@pytest.mark.parametrize("script", ["local_cluster.sh", "mlflow_server.sh"])
def test_scripts_are_valid_bash_and_explain_themselves(script):
    subprocess.run(["bash", "-n", str(CLUSTER / script)], check=True)
    usage = subprocess.run(["bash", str(CLUSTER / script)], capture_output=True, text=True)
    assert usage.returncode == 2 and "start" in usage.stdout and "stop" in usage.stdout


def test_each_submission_stages_code_of_its_own_content(tmp_path):
    """Ray shares a working_dir package between jobs of equal content, and may delete it under one of
    them when the other ends: every submission's staged code differs, and a --config file is staged."""
    from jobs.submit import SUBMISSION_STAMP, stage_code

    config = tmp_path / "train.yaml"
    config.write_text("recipe: fast\n")
    first, second = tmp_path / "first", tmp_path / "second"
    for staging in (first, second):
        staging.mkdir()
        args = stage_code(["--config", str(config), "--set", "x=1"], staging)
    assert args == ["--config", "_submitted/train.yaml", "--set", "x=1"]
    assert (second / "_submitted" / "train.yaml").read_text() == "recipe: fast\n"
    assert (first / "detr" / "model.py").read_bytes() == (second / "detr" / "model.py").read_bytes()
    assert (first / SUBMISSION_STAMP).read_text() != (second / SUBMISSION_STAMP).read_text()
