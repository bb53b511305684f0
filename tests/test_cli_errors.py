"""A missing input fails every command at once, in one line, before Ray or a tracking database starts."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from jobs.cli import _run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("argv, message", [
    # A relative path is named as the absolute path it was looked for at: the working directory is part of it.
    (["train", "--config", "train.yaml"], "detr train: error: TMP/nope.json: COCO annotation file not found"),
    (["train", "--config", "train.yaml", "--set", "data.train=data.json", "--set", "init_from=gone.pt"],
     "detr train: error: model 'gone.pt': no such file, and not an MLflow URI (models:/..., runs:/...)"),
    (["ingest", "nope.json", "out"], "detr ingest: error: TMP/nope.json: COCO annotation file not found"),
    (["label", "--model", "gone.pt", "--input", "photos", "--output", "out"],
     "detr label: error: model 'gone.pt': no such file, and not an MLflow URI (models:/..., runs:/...)"),
    (["evaluate", "--model", "gone.pt", "--data", "data.json"],
     "detr evaluate: error: model 'gone.pt': no such file, and not an MLflow URI (models:/..., runs:/...)"),
    (["export", "--model", "gone.pt", "--output", "out"],
     "detr export: error: model 'gone.pt': no such file, and not an MLflow URI (models:/..., runs:/...)"),
])
def test_a_missing_input_is_one_line_before_anything_starts(tmp_path, argv, message):
    (tmp_path / "train.yaml").write_text("data: {train: nope.json}\n")
    (tmp_path / "data.json").write_text('{"images": [], "annotations": [], "categories": []}')
    (tmp_path / "photos").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    done = subprocess.run([sys.executable, "-m", "jobs.cli", *argv], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={**env, "PYTHONPATH": ROOT})
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip() == message.replace("TMP", str(tmp_path))  # nothing else: no Ray start-up, no MLflow database created
    assert sorted(os.listdir(tmp_path)) == ["data.json", "photos", "train.yaml"]


class _Raises:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def run(self, args) -> int:
        raise self.exc


def test_an_os_error_naming_its_file_is_one_line_and_one_without_is_a_traceback(capsys):
    assert _run(_Raises(IsADirectoryError(21, "Is a directory", "labels/")), None, "detr x") == 1
    assert capsys.readouterr().err == "detr x: error: [Errno 21] Is a directory: 'labels/'\n"
    with pytest.raises(ConnectionResetError):
        _run(_Raises(ConnectionResetError(104, "Connection reset by peer")), None, "detr x")


def test_a_cluster_that_wants_a_token_gets_one_line_saying_what_to_export(capsys, monkeypatch):
    from ray.exceptions import AuthenticationError

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    assert _run(_Raises(AuthenticationError("Unauthenticated")), None, "detr submit") == 1
    err = capsys.readouterr().err
    assert err.startswith("detr submit: error: the Ray cluster uses token authentication and refused this client: "
                          "export RAY_AUTH_MODE=token") and err.count("\n") == 1


def test_a_file_that_is_no_checkpoint_is_named(tmp_path):
    from jobs.model_sources import load_model

    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=f"^{bad}: not a loadable weights-only checkpoint"):
        load_model(str(bad))


def test_no_cluster_at_the_address_is_one_line(capsys):
    import socket

    from jobs.cli import main as detr

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert detr(["jobs", "list", "--address", f"127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err
    assert err == (f"detr jobs: error: no Ray cluster answers at http://127.0.0.1:{port} (ConnectionError): start one "
                   "(cluster/local_cluster.sh start) or give its dashboard address with --address or $RAY_ADDRESS\n")
