"""Every job on the production topology (tests/topology.py): data, checkpoints, models and outputs on S3, one
Ray node that cannot see the driver's disk, MLflow on PostgreSQL with its artifacts on S3.

The jobs run as a user runs them, `detr ...` in a process of their own. The module's data and trained model
are shared by its tests, in file order: train (submitted, fine-tuned from a checkpoint on S3, a worker killed on
the isolated node, then resumed by a re-run), evaluate, promote and roll back, label (prefix and tar, detection
and panoptic, two jobs at once, one of them submitted, re-runs, a killed driver), the pyfunc model from the
registry in a fresh process.
"""
from __future__ import annotations

import io
import json
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from topology import BIN, ISOLATED_RESOURCE

pytestmark = [pytest.mark.topology, pytest.mark.ray, pytest.mark.mlflow]

MODEL = "topology-detector"


@pytest.fixture(scope="module")
def shapes(topology, tmp_path_factory):
    """A synthetic dataset written on the driver's disk, then copied to S3 (the only copy the nodes see)."""
    from jobs.synthetic_data import SyntheticConfig, write_dataset

    local = tmp_path_factory.mktemp("topology-shapes")
    write_dataset(str(local), SyntheticConfig(images=24, classes=2, min_image_size=64, max_image_size=80,
                                              max_object_size=40, val_fraction=0.25, seed=11))
    uri = topology.s3.upload_folder(local, topology.uri("shapes"))
    return {"local": local, "uri": uri, "images": sorted(p.name for p in (local / "images").iterdir())}


KILLER = """
import os, signal, sys, time
import pyarrow.fs as pafs
from ray.util.state import list_actors, list_nodes
dashboard, run_prefix, resource = sys.argv[1:4]
fs, root = pafs.FileSystem.from_uri(run_prefix)
deadline = time.time() + 400
while time.time() < deadline:
    try:
        names = [i.path for i in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))]
    except OSError:
        names = []
    if any(n.endswith("checkpoint_manager_snapshot.json") for n in names):  # Ray Train registered a checkpoint
        break
    time.sleep(1)
isolated = next(n.node_id for n in list_nodes(address=dashboard, detail=True) if resource in (n.resources_total or {}))
for actor in list_actors(address=dashboard, filters=[("state", "=", "ALIVE")], detail=True, limit=1000):
    if "RayTrainWorker" in actor.class_name and actor.node_id == isolated:
        os.kill(actor.pid, signal.SIGKILL)
        print(actor.pid)
        break
"""


@pytest.fixture(scope="module")
def ingested(topology, shapes):
    """`detr ingest` of the COCO JSON and its images on S3 into Parquet shards on S3."""
    out = topology.uri("ingested")
    done = topology.detr("ingest", f"{shapes['uri']}/train.json", out)
    return {"uri": out, "stdout": done.stdout}


def test_ingest_reads_s3_and_writes_parquet_shards_to_s3(topology, shapes, ingested):
    with topology.s3.environment():
        from pipelines import storage

        manifest = json.loads(storage.read_text(f"{ingested['uri']}/manifest.json"))
    train = json.loads((shapes["local"] / "train.json").read_text())
    assert manifest["rows"] == len(train["images"]) and manifest["shards"]
    keys = topology.s3.keys(ingested["uri"])
    assert all(any(k.endswith(s["path"]) for k in keys) for s in manifest["shards"])


@pytest.fixture(scope="module")
def trained(topology, shapes, ingested):
    """`detr submit train` (a Ray job: its driver runs on the cluster, from the uploaded working directory) on
    the ingested shards (validated on the S3 COCO JSON) with S3 storage, two workers spread over both nodes,
    fine-tuned from a checkpoint on S3 of another class count (91: the class head is replaced) with an average
    of the weights; a worker on the isolated node is killed once Ray Train registered the first checkpoint.
    Then the same job run again from the driver's machine with one more epoch resumes the run from S3
    (version 2), and a third time does nothing. Two backbone stages: a model of 0.9M weights, whose
    checkpoints (with the optimizer's state) cross S3 in moments; the 11M of the four stages took minutes."""
    import torch

    from detr import build_model, save_checkpoint

    torch.manual_seed(1)
    initial = build_model("tiny", num_classes=91, num_queries=8, backbone_stages=2)
    initial_file = save_checkpoint(initial, topology.driver_tmp / "initial.pt")
    initial_uri = topology.uri("weights", "initial.pt")
    bucket, _, key = initial_uri[len("s3://"):].partition("/")
    topology.s3.client().upload_file(str(initial_file), bucket, key)
    run_prefix = topology.uri("runs")
    config = topology.driver_tmp / "topology-train.yaml"
    config.write_text(
        f"data: {{train: {ingested['uri']}, val: {shapes['uri']}/val.json, transforms: small, "
        "batch_size: 2}\n"
        "model: {preset: tiny, num_queries: 8, backbone_stages: 2}\n"
        f"init_from: {initial_uri}\n"
        "optimizer: {ema_decay: 0.5, lr_schedule: cosine}\n"
        "schedule: {epochs: 3, max_steps_per_epoch: 3, eval_every: 3, log_images: 1, log_every_steps: 1, "
        "time_budget_minutes: 60}\n"
        "scaling: {num_workers: 2, placement_strategy: SPREAD}\n"
        f"storage: {{path: {run_prefix}, run_name: killed, max_failures: 2}}\n"
        f"tracking: {{experiment: topology, registered_model: {MODEL}}}\n")
    killer = subprocess.Popen([sys.executable, "-c", KILLER, topology.cluster.dashboard, f"{run_prefix}/killed",
                               ISOLATED_RESOURCE], env=topology.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        done = topology.detr("submit", "train", "--address", topology.cluster.dashboard, "--no-requirements", "--wait",
                             "--", "--config", str(config), timeout=900)
    finally:
        killed, killer_err = killer.communicate(timeout=120)
    assert done.stdout.strip().splitlines()[-1].endswith("SUCCEEDED"), done.stdout[-3000:]
    resumed = topology.detr("train", "--config", str(config), "--set", "schedule.epochs=4", timeout=900)
    again = topology.detr("train", "--config", str(config), "--set", "schedule.epochs=4")
    return {"stdout": done.stdout, "killed": killed.strip(), "killer_err": killer_err, "run_prefix": run_prefix,
            "initial": initial, "resumed": resumed.stdout, "again": again.stdout}


def test_training_on_s3_survives_a_killed_worker_and_registers_in_postgres(topology, trained):
    from mlflow.tracking import MlflowClient

    from detr import load_checkpoint

    assert trained["killed"], f"no training worker was found on the isolated node: {trained['killer_err'][-2000:]}"
    # The submitted job's log is the job's own progress: a line per step, the resumed worker group, each epoch.
    printed = trained["stdout"]
    assert "epoch 1/3  step 1  loss " in printed and "epoch 3/3 done  loss " in printed, printed[-3000:]
    # (killed once the first checkpoint is registered: the second may be there too by then)
    assert re.search(r"resumed from the checkpoint after epoch (1 \(step 3|2 \(step 6)\)", printed), printed[-3000:]
    assert "RayTrainWorker" not in printed
    client = MlflowClient(topology.tracking_uri)
    version = client.get_model_version(MODEL, "1")
    run = client.get_run(version.run_id)
    assert version.tags["raydetr.train_run_id"] == run.info.run_id
    params = run.data.params
    assert params["model.hidden_dim"] == "64" and params["model.num_classes"] == "3"
    assert params["job.scaling.num_workers"] == "2" and params["job.data.train"].startswith("s3://")
    for key in ("train_loss_ce", "train_loss_bbox", "train_loss_giou", "lr_transformer", "lr_backbone",
                "train_images_per_s", "val_AP", "val_AP50"):
        assert client.get_metric_history(run.info.run_id, key), key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "train_config.yaml" in artifacts and len(client.list_artifacts(run.info.run_id, "detections")) == 1
    # One history although a worker died, and although the run was resumed from another machine: every step once.
    assert [m.step for m in client.get_metric_history(run.info.run_id, "epoch")] == [0, 1, 2, 3]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == list(range(1, 13))
    # The cosine schedule ran to the end of each run's epochs on both workers, through the kill and the resume:
    # 1e-4 times 0.05 + 0.95 * (1 + cos(pi * epochs done / epochs)) / 2 at each epoch's end (3 epochs, then 4).
    rates = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "lr_transformer"),
                                     key=lambda m: m.step)]
    assert rates == pytest.approx([7.625e-5, 2.875e-5, 5e-6, 5e-6])
    assert "resumed from the checkpoint after epoch 3 (step 9)" in trained["resumed"]
    assert f"model: models:/{MODEL}/2" in trained["resumed"] and "finished already" in trained["again"]
    assert client.get_model_version(MODEL, "2").run_id == run.info.run_id
    assert sorted(int(v.version) for v in client.search_model_versions(f"name='{MODEL}'")) == [1, 2]
    # The model's files went through the tracking server to S3, not to anyone's disk.
    model_keys = topology.s3.keys("s3://raydetr-mlflow/artifacts")
    assert any(k.endswith("MLmodel") for k in model_keys) and any("detections" in k for k in model_keys)

    # The checkpoints are on S3. model.pt holds the weights' average (what was validated and registered), the
    # state file the weights as trained; the average went on through the kill and the resume: 3 updates an epoch.
    keys = topology.s3.keys(f"{trained['run_prefix']}/killed")
    with topology.s3.environment():
        import torch

        from pipelines import storage

        def checkpoint_file(epoch_dir: str, name: str) -> bytes:
            return storage.read_bytes(f"{trained['run_prefix']}/killed/{epoch_dir}/{name}")

        # The newest checkpoint (their folders are named by time): the fourth epoch's.
        last = sorted({k.split("/")[-2] for k in keys if "checkpoint_" in k and k.endswith("model.pt")})[-1]
        last_state = torch.load(io.BytesIO(checkpoint_file(last, "train_state.pt")), map_location="cpu",
                                weights_only=True)
        model, metadata = load_checkpoint(checkpoint_file(last, "model.pt"))
    assert last_state["epoch"] == 4 and last_state["ema_updates"] == 12 and metadata["ema_decay"] == 0.5
    assert model.config.num_queries == 8 and model.config.num_classes == 3 and model.class_embed.weight.shape == (4, 64)
    assert [c["id"] for c in metadata["categories"]] == [1, 2] and metadata["mlflow_run_id"] == run.info.run_id
    # The stem never trains: it holds the initial file's weights; the trained weights differ from the average.
    assert torch.equal(model.backbone.body.conv1.weight, trained["initial"].backbone.body.conv1.weight)
    assert not torch.allclose(last_state["trained_model"]["class_embed.weight"], model.class_embed.weight)


def test_evaluate_promote_and_rollback_with_actors_on_the_isolated_node(topology, shapes, trained):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(topology.tracking_uri)
    # v1 after 3 epochs and v2 after 4 (the `trained` fixture)
    val = f"{shapes['uri']}/val.json"
    # Ray Data starts an actor pool's actors as the data flows: on so small a set one actor (on the head) can do
    # all the work before the second is placed. Waiting for both makes the isolated node hold one.
    topology.detr("evaluate", "--model", f"models:/{MODEL}/1", "--data", val, "--concurrency", "2",
                  env=topology.env(RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S="300"))
    actors = topology.actor_classes_on_isolated_node()
    assert any("EvalPredictor" in name for name in actors), sorted(set(actors))

    first = topology.detr("promote", "--name", MODEL, "--candidate", "1", "--data", val)
    assert "moved alias 'champion' to v1" in first.stdout
    second = topology.detr("promote", "--name", MODEL, "--candidate", "2", "--data", val, "--min-gain", "-1")
    assert "moved alias 'champion' to v2" in second.stdout
    assert client.get_model_version_by_alias(MODEL, "champion").version == "2"
    topology.detr("rollback", "--name", MODEL, "--alias", "champion")
    assert client.get_model_version_by_alias(MODEL, "champion").version == "1"

    # An int8 export of v1, written to S3 and calibrated on S3 images, evaluated from there: its graph reaches
    # the actors (one on the isolated node) through the object store; v1 gets its int8 headline tag.
    export = topology.uri("exports", "v1-int8")
    topology.detr("export", "--model", f"models:/{MODEL}/1", "--precision", "int8", "--calibration", val,
                  "--calibration-images", "8", "--output", export)
    before = sum("EvalPredictor" in name for name in topology.actor_classes_on_isolated_node())
    done = topology.detr("evaluate", "--model", export, "--data", val, "--concurrency", "2",
                         env=topology.env(RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S="300"))
    assert "in onnxruntime (int8)" in done.stdout
    assert sum("EvalPredictor" in name for name in topology.actor_classes_on_isolated_node()) > before
    tags = client.get_model_version(MODEL, "1").tags
    assert [t for t in tags if t.endswith(".onnxruntime.int8.AP")], sorted(tags)


def _label_rows(topology, output: str, kind: str = "labels") -> list[dict]:
    from pipelines.labelling.output import LabelOutput

    with topology.s3.environment():
        return LabelOutput(output).read(kind).to_pylist()


def test_label_an_s3_prefix_with_two_jobs_at_once_one_submitted_then_more_images_exactly_once(topology, shapes, trained):
    # The prefix is listed by a task of the job (never by the driver): nested folders are followed, a broken
    # image becomes an error row, a text file is skipped. Two jobs write the output at once (one labels a
    # sub-folder that the other's prefix holds too); images that arrive later are the only ones a re-run
    # labels, and every image lands in exactly one row or one error.
    from messy_data import corrupt_jpeg

    photos, output = topology.uri("photos") + "/", topology.uri("labels", "prefix")
    local = shapes["local"] / "images"
    first, later = shapes["images"][:12], shapes["images"][12:]
    for i, name in enumerate(first):
        topology.s3.put(f"{photos}{'day1/' if i % 3 == 0 else ''}{name}", (local / name).read_bytes())
    topology.s3.put(f"{photos}broken.jpg", corrupt_jpeg())
    topology.s3.put(f"{photos}notes.txt", b"not an image")
    common = ("--model", f"models:/{MODEL}@champion", "--output", output, "--cpus-per-actor", "1",
              "--score-threshold", "0.0", "--top-k", "3", "--rows-per-file", "2")
    # One job runs its driver here, the other is submitted to the cluster (`detr submit label`: its driver runs
    # on the head, from the uploaded working directory; training was submitted too, in the `trained` fixture).
    submit = ["submit", "label", "--address", topology.cluster.dashboard, "--no-requirements", "--wait", "--"]
    jobs = [subprocess.Popen([str(BIN / "detr"), *how, "--input", prefix, *common], env=topology.env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=topology.driver_tmp)
            for how, prefix in ((["label"], photos), ([*submit], f"{photos}day1/"))]
    outputs = [job.communicate(timeout=900)[0] for job in jobs]
    topology.logs += outputs
    assert [job.returncode for job in jobs] == [0, 0], outputs
    assert outputs[1].strip().splitlines()[-1].endswith("SUCCEEDED"), outputs[1][-3000:]
    rows = _label_rows(topology, output)
    assert sorted(r["key"].rsplit("/", 1)[1] for r in rows) == sorted(first)  # both jobs' rows, each image once
    runs = _manifest(topology, output)["runs"]
    assert len(runs) == 2 and {r["status"] for r in runs} == {"complete"}
    for name in later:
        topology.s3.put(f"{photos}day2/{name}", (local / name).read_bytes())
    again = topology.detr("label", "--input", photos, *common, "--concurrency", "2")
    assert f"labelled {len(later)} images" in again.stdout
    rows = _label_rows(topology, output)
    assert sorted(r["key"].rsplit("/", 1)[1] for r in rows) == shapes["images"]  # each exactly once
    assert [r["image"] for r in _label_rows(topology, output, "errors")] == [f"{photos}broken.jpg"]


def _manifest(topology, output: str) -> dict:
    from pipelines.labelling.output import LabelOutput

    with topology.s3.environment():
        return LabelOutput(output).read_manifest()


def test_label_an_s3_tar_with_a_killed_driver_then_resume(topology, shapes, trained):
    from messy_data import corrupt_jpeg

    archive = topology.driver_tmp / "images.tar"
    with tarfile.open(archive, "w") as tar:
        for name in shapes["images"]:
            tar.add(shapes["local"] / "images" / name, arcname=f"photos/{name}")
        broken = tarfile.TarInfo("photos/broken.jpg")
        broken.size = len(corrupt_jpeg())
        tar.addfile(broken, io.BytesIO(corrupt_jpeg()))
    tar_uri = topology.uri("archives", "images.tar")
    bucket, _, key = tar_uri[len("s3://"):].partition("/")
    topology.s3.client().upload_file(str(archive), bucket, key)
    output = topology.uri("labels", "tar")
    folder = topology.uri("archives") + "/"  # a folder that turns out to hold archives: their members are labelled
    args = [str(BIN / "detr"), "label", "--model", f"models:/{MODEL}@champion", "--input", folder, "--output", output,
            "--concurrency", "2", "--cpus-per-actor", "1", "--rows-per-file", "2", "--commit-seconds", "0.5",
            "--batch-size", "1"]
    driver = subprocess.Popen(args, env=topology.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              cwd=topology.driver_tmp)
    deadline = time.time() + 300
    while time.time() < deadline and driver.poll() is None:
        if any("/labels/part-" in k for k in topology.s3.keys(f"{output}/labels")):
            driver.send_signal(signal.SIGKILL)
            break
        time.sleep(0.2)
    topology.logs.append(driver.communicate()[0])
    partial = _label_rows(topology, output)
    assert 0 < len(partial) <= len(shapes["images"])
    killed_midway = len(partial) < len(shapes["images"])  # (the last commit can beat the kill on a busy machine)
    assert _manifest(topology, output)["status"] == ("running" if killed_midway else "complete")
    resumed = topology.detr(*args[1:])
    assert f"labelled {len(shapes['images']) - len(partial)} images" in resumed.stdout, resumed.stdout[-2000:]
    rows, errors = _label_rows(topology, output), _label_rows(topology, output, "errors")
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)) == len(shapes["images"])  # every image exactly once, none lost
    assert {k.split("!", 1)[1] for k in keys} == {f"photos/{n}" for n in shapes["images"]}
    assert [e["image"].split("!", 1)[1] for e in errors] == ["photos/broken.jpg"]
    manifest = _manifest(topology, output)
    assert [r["status"] for r in manifest["runs"]] == ["running" if killed_midway else "complete", "complete"]
    assert manifest["totals"]["images_labelled"] == len(shapes["images"]) and manifest["totals"]["errors"] == 1


def test_panoptic_labelling_of_s3_images_with_a_checkpoint_on_the_drivers_disk(topology, tmp_path):
    from panoptic_model import panoptic_images, save_tiny_panoptic
    from pipelines.training.transforms import TransformsConfig

    model = save_tiny_panoptic(tmp_path / "panoptic.pt", TransformsConfig.small())  # hidden from the isolated node
    images = panoptic_images(tmp_path / "pan")
    uri = topology.s3.upload_folder(images[0].parent, topology.uri("pan-images"))
    output = topology.uri("labels", "panoptic")
    topology.detr("label", "--task", "panoptic", "--model", model, "--input", uri + "/", "--output", output,
         "--concurrency", "2", "--panoptic-threshold", "0.3")
    rows = _label_rows(topology, output)
    assert len(rows) == len(images) and all(r["segments"] for r in rows)
    pngs = topology.s3.keys(f"{output}/panoptic")
    assert sorted(Path(k).name for k in pngs if k.endswith(".png")) == sorted(Path(r["panoptic_file"]).name for r in rows)


PREDICT = """
import json, sys
import mlflow.pyfunc, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
frame = model.predict(pd.DataFrame({"path": sys.argv[2:]}))
print(json.dumps({"errors": [e for e in frame["error"]], "boxes": [len(b) for b in frame["boxes"]]}))
"""


def test_the_registered_pyfunc_predicts_on_s3_images_in_a_fresh_process(topology, shapes, trained):
    uris = [f"{shapes['uri']}/images/{name}" for name in shapes["images"][:3]]
    done = subprocess.run([sys.executable, "-c", PREDICT, f"models:/{MODEL}@champion", *uris], env=topology.env(),
                          capture_output=True, text=True, timeout=300, cwd=topology.driver_tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["errors"] == ["", "", ""] and len(result["boxes"]) == 3, result


def test_credentials_never_reach_params_tags_manifests_logs_or_error_tables(topology):
    """Run last in the module: everything the topology's jobs wrote so far is searched for the secret key."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from mlflow.tracking import MlflowClient

    secret = topology.s3.credentials["AWS_SECRET_ACCESS_KEY"]
    client = MlflowClient(topology.tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    texts = [json.dumps([r.data.params, r.data.tags]) for r in client.search_runs(experiments, max_results=1000)]
    texts += [json.dumps(v.tags) for m in client.search_registered_models() for v in
              client.search_model_versions(f"name='{m.name}'")]
    with topology.s3.environment():
        from pipelines import storage

        for key in topology.s3.keys(topology.bucket + "/"):
            uri = f"{topology.bucket}/{key}"
            if key.endswith(".json"):
                texts.append(storage.read_text(uri))
            elif "/errors/" in key and key.endswith(".parquet"):
                table = pq.read_table(pa.BufferReader(storage.read_bytes(uri)))
                texts.append(json.dumps(table.to_pylist(), default=str))
    assert len(texts) > 20 and len(topology.logs) > 10
    assert not [t for t in texts + topology.logs if secret in t]

