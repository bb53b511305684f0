"""The README's commands, run as it writes them, in order, in a fresh folder: a newcomer's first hour.

Each `detr` command of the README's quick start (the sections from Data to Label) runs with the README's
own arguments; only sizes are made tiny, by arguments appended to the command (argparse keeps the last
value given): fewer images, a few training steps. Of the panoptic section, the dataset is made and the
training command's config is resolved (`--print-config`: its recipe, preset and keys exist); training
and evaluating a panoptic model run in tests/test_panoptic_jobs.py. Commands run on the session's Ray cluster ($RAY_ADDRESS) with
MLflow's default store in that folder, as the README's user has it; the first training in a process of
its own, to see what it prints, the others in this one (the same `detr` entry point, without the start-up). A README change that adds, removes or
reorders a command fails here until this test follows it. (The cluster section's commands run in
tests/test_cluster_submission.py.)
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.mlflow]

ROOT = Path(__file__).resolve().parents[1]
TINY_TRAINING = ["--set", "schedule.epochs=1", "--set", "schedule.max_steps_per_epoch=3", "--set",
                 "schedule.log_every_steps=1", "--set", "schedule.log_images=0", "--set", "data.batch_size=4"]
TINY = {
    "detr make-dataset data/shapes": ["--images", "48"],
    "detr make-dataset data/pan": ["--images", "8"],
    "detr train --config examples/train.yaml --set recipe=fast_panoptic": ["--print-config"],
    "detr train": TINY_TRAINING,
    "detr promote": ["--min-gain", "-1"],  # a few steps of training need not beat the first version
}
"""Arguments appended to the commands that start with these words."""


def readme_commands(section_from: str = "## Data", section_to: str = "## What holds") -> list[str]:
    """The `detr` commands of the README's bash blocks between two headings, continuations joined and
    comments dropped."""
    text = (ROOT / "README.md").read_text()
    text = text[text.index(section_from):text.index(section_to)]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line.startswith("detr "):
                commands.append(re.sub(r"\s+", " ", line))
    return commands


def tiny(command: str) -> list[str]:
    words = shlex.split(command)
    for prefix, extra in TINY.items():
        if command.startswith(prefix):
            return words + extra
    return words


def test_the_readme_commands_run_as_written(ray_cluster, tmp_path, monkeypatch, capsys):
    from jobs.cli import main as detr

    commands = readme_commands()
    assert [" ".join(c.split()[:2]) for c in commands] == [
        "detr make-dataset", "detr ingest", "detr train", "detr train", "detr evaluate", "detr promote",
        "detr promote", "detr rollback", "detr explain", "detr label", "detr export", "detr make-dataset",
        "detr train", "detr evaluate"]
    commands = commands[:-1]  # the panoptic model's evaluation: see the module's docstring
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    for name in [k for k in os.environ if k.startswith("MLFLOW_")]:
        monkeypatch.delenv(name)  # MLflow's default store, ./mlflow.db, as the README's user has it
    monkeypatch.setenv("RAY_ADDRESS", ray_cluster.address)
    printed = {}
    for i, command in enumerate(commands):
        words = tiny(command)
        if i == 2:  # the first training as its own process, printing what a user sees
            done = subprocess.run([str(Path(sys.executable).parent / "detr"), *words[1:]], capture_output=True,
                                  text=True, timeout=600, env=dict(os.environ, PYTHONPATH=str(ROOT)))
            code, output = done.returncode, done.stdout + done.stderr
        else:
            code = detr(words[1:])
            captured = capsys.readouterr()
            output = captured.out + captured.err
        assert code == 0, f"{command}\n{output[-3000:]}"
        printed.setdefault(" ".join(command.split()[:2]), []).append(output)

    first_training, second_training = printed["detr train"][:2]
    # The job's own progress, and not Ray's internals.
    assert re.search(r"^epoch 1/1 {2}step 1 {2}loss \d", first_training, flags=re.M), first_training
    assert "epoch 1/1 done" in first_training and "model: models:/shapes-detector/1" in first_training
    assert "TrainController" not in first_training and "RayTrainWorker" not in first_training
    assert len(first_training.splitlines()) < 40, first_training
    assert "model: models:/shapes-detector/2" in second_training  # another run name: a second version
    promotions = printed["detr promote"]
    assert "moved alias 'champion' to v1 (no current holder" in promotions[0], promotions[0]
    assert "moved alias 'champion' to v2" in promotions[1], promotions[1]
    assert "alias 'champion' moved back from v2 to v1" in printed["detr rollback"][0]
    assert re.search(r"labelled 48 images \(\d+ detections\), 0 errors", printed["detr label"][0]), printed["detr label"]
    # Relative outputs land in the user's folder, also when Ray's workers write them (their working directory
    # is not the driver's).
    assert list((tmp_path / "data" / "shapes-parquet" / "data").glob("*.parquet"))
    manifest = json.loads((tmp_path / "labels" / "shapes" / "manifest.json").read_text())
    assert manifest["model"]["name"] == "shapes-detector" and manifest["model"]["version"] == "1"  # rolled back
    analysis = json.loads((tmp_path / "plots" / "shapes" / "analysis.json").read_text())
    assert analysis["per_layer_ap"] and (tmp_path / "plots" / "shapes" / "per_layer_ap.png").is_file()
    assert len(list((tmp_path / "explained").glob("*_decoder.png"))) == 2
    export = json.loads((tmp_path / "exports" / "shapes" / "raydetr_export.json").read_text())
    assert export["model"]["name"] == "shapes-detector" and export["model"]["version"] == "1"
    panoptic = printed["detr train"][2]
    assert "recipe: fast_panoptic" in panoptic and "\n  mask_head:\n" in panoptic, panoptic
