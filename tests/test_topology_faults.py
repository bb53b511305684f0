"""Faults and bad input on the production topology: the object store going down mid-labelling, wrong buckets,
prefixes and credentials, a tracking server that is down. Each ends in a clear line, and nothing is lost."""
from __future__ import annotations

import subprocess
import time

import pytest

from topology import BIN, free_port

pytestmark = [pytest.mark.topology, pytest.mark.ray, pytest.mark.mlflow]


@pytest.fixture(scope="module")
def photos(topology, tmp_path_factory):
    """40 images on S3 and a tiny random model on the driver's disk."""
    import detr
    from jobs.synthetic_data import SyntheticConfig, write_dataset
    from pipelines.inference.detector import transforms_to_metadata
    from pipelines.training.transforms import TransformsConfig

    local = tmp_path_factory.mktemp("fault-photos")
    write_dataset(str(local), SyntheticConfig(images=40, classes=2, min_image_size=64, max_image_size=64,
                                              val_fraction=0.0, seed=21))
    uri = topology.s3.upload_folder(local / "images", topology.uri("fault-photos"))
    model = local / "tiny.pt"
    detr.save_checkpoint(detr.build_model("tiny", num_classes=3, num_queries=5).eval(), model,
                         {"categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
                          "transforms": transforms_to_metadata(TransformsConfig.small())})
    return {"uri": uri, "model": str(model), "count": 40}


def test_the_store_goes_down_mid_labelling_and_the_rerun_finishes_the_job(topology, photos):
    from pipelines.labelling.output import LabelOutput

    output = topology.uri("labels", "outage")
    args = [str(BIN / "detr"), "label", "--model", photos["model"], "--input", photos["uri"] + "/", "--output",
            output, "--concurrency", "1", "--batch-size", "1", "--rows-per-file", "2", "--commit-seconds", "0.2"]
    driver = subprocess.Popen(args, env=topology.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=topology.driver_tmp)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and driver.poll() is None:
            if any(k.endswith(".parquet") for k in topology.s3.keys(f"{output}/labels")):
                break
            time.sleep(0.2)
        topology.s3.go_down()
        stdout, stderr = driver.communicate(timeout=300)
    finally:
        topology.s3.come_back()
        if driver.poll() is None:
            driver.kill()
    topology.logs += [stdout, stderr]
    assert driver.returncode == 1, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert "did not answer" in last and "re-run" in last, stderr[-3000:]

    done = topology.detr(*args[1:])
    with topology.s3.environment():
        output_now = LabelOutput(output)
        labels, errors = output_now.read("labels").to_pylist(), output_now.read("errors").to_pylist()
    keys = [r["key"] for r in labels] + [r["image"] for r in errors]
    assert len(keys) == len(set(keys)) == photos["count"], done.stdout  # images + errors == input, no key twice
    assert errors == []  # the outage made no image an error


@pytest.mark.parametrize("case", ["missing bucket", "wrong prefix", "wrong credentials"])
def test_a_wrong_location_or_credentials_fail_in_seconds_naming_the_uri(topology, photos, case):
    env = topology.env()
    uri = photos["uri"] + "/"
    if case == "missing bucket":
        uri = "s3://no-such-bucket-here/photos/"
    elif case == "wrong prefix":
        uri = topology.uri("no-such-prefix") + "/"
    else:
        env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
    start = time.time()
    done = topology.detr("label", "--model", photos["model"], "--input", uri, "--output",
                         topology.uri("labels", "never"), check=False, env=env, timeout=120)
    seconds = time.time() - start
    topology.logs += [done.stdout, done.stderr]
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr[-3000:]
    assert uri.rstrip("/") in lines[0] and seconds < 30, (lines, seconds)
    expected = {"missing bucket": "bucket 'no-such-bucket-here' does not exist", "wrong prefix": "no such file or folder",
                "wrong credentials": "credentials"}[case]
    assert expected in lines[0]
    assert not topology.s3.keys(topology.uri("labels", "never"))  # no work started


@pytest.mark.parametrize("job", ["train", "evaluate", "promote"])
def test_a_tracking_server_that_is_down_fails_the_job_in_seconds(topology, photos, job):
    dead = f"http://127.0.0.1:{free_port()}"
    config = topology.driver_tmp / "dead-tracking.yaml"
    config.write_text(f"data: {{train: {photos['uri']}/}}\nmodel: {{preset: tiny}}\n"
                      f"storage: {{path: {topology.uri('runs')}}}\n")
    args = {"train": ["train", "--config", str(config)],
            "evaluate": ["evaluate", "--model", "models:/anything/1", "--data", f"{photos['uri']}/"],
            "promote": ["promote", "--name", "anything", "--candidate", "1", "--data", f"{photos['uri']}/"]}[job]
    start = time.time()
    done = topology.detr(*args, check=False, env=topology.env(MLFLOW_TRACKING_URI=dead), timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr[-3000:]
    assert dead in lines[0] and "not reachable" in lines[0] and time.time() - start < 30
