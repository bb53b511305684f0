"""Two label runs writing one output at once: nothing one writes replaces what the other wrote."""
from __future__ import annotations

import json
import threading

import pyarrow as pa
import pytest

from pipelines import storage
from pipelines.labelling.manifest import ManifestRun, new_manifest
from pipelines.labelling.options import LabelOptions
from pipelines.labelling.output import ERRORS, LABELS, LabelOutput
from pipelines.labelling.schema import RESULT_SCHEMA
from pipelines.labelling.writer import ChunkWriter, ModelIdentity

MODEL = {"uri": "m.pt", "name": "m", "version": "", "run_id": "", "sha256": "aa"}
SETTINGS = LabelOptions().row_settings()


def results(keys: list[str]) -> pa.Table:
    n = len(keys)
    columns = {"key": keys, "source": ["in"] * n, "image_id": list(range(n)), "width": [4] * n, "height": [4] * n,
               "content_hash": ["h"] * n, "error_reason": [""] * n, "error_detail": [""] * n,
               "boxes": [[[0.0, 0.0, 1.0, 1.0]]] * n, "scores": [[0.9]] * n, "labels": [[1]] * n,
               "label_names": [["a"]] * n, "preview_png": [None] * n, "explain_pngs": [None] * n}
    return pa.Table.from_pydict(columns, schema=RESULT_SCHEMA)


def label_run(out: LabelOutput, name: str, keys: list[str]) -> ManifestRun:
    """What `detr label` does with an output, without a model: start, commit in parts, finish."""
    run = ManifestRun.start(out, MODEL, SETTINGS, "folder", label_run=name, input=name)
    writer = ChunkWriter(out, out.scan(), ModelIdentity("m"), name, rows_per_file=2, commit_seconds=3600, draw=0)
    for i in range(0, len(keys), 2):
        writer.add(results(keys[i:i + 2]))  # a part every two rows
    writer.flush()
    run.finish(labelled=writer.counts.labelled, errors=0, detections=writer.counts.detections)
    return run


def test_two_runs_started_together_keep_both_runs_rows_and_records(tmp_path):
    out = LabelOutput(str(tmp_path / "out"))
    half_a, half_b = [f"/in/a{i}.jpg" for i in range(5)], [f"/in/b{i}.jpg" for i in range(5)]
    # Both scan the (empty) output before either commits: their part numbers are the same.
    runs = [ManifestRun.start(out, MODEL, SETTINGS, "folder", label_run=n, input=n) for n in ("run-a", "run-b")]
    writers = [ChunkWriter(out, out.scan(), ModelIdentity("m"), n, rows_per_file=2, commit_seconds=3600, draw=0)
               for n in ("run-a", "run-b")]
    for writer, keys in zip(writers, (half_a, half_b + half_a[:1])):  # b also labels one of a's images
        for i in range(0, len(keys), 2):
            writer.add(results(keys[i:i + 2]))
        writer.flush()
    for run, writer in zip(runs, writers):
        run.finish(labelled=writer.counts.labelled, errors=0, detections=writer.counts.detections)
    keys = out.read(LABELS)["key"].to_pylist()
    assert sorted(keys) == sorted(half_a + half_b)  # every row of both runs, each image once
    assert len(out.parts(LABELS)) == 6 and len({n for n, _ in out.parts(LABELS)}) == 3
    manifest = out.read_manifest()
    assert [r["label_run"] for r in manifest["runs"]] == ["run-a", "run-b"]
    assert [r["status"] for r in manifest["runs"]] == ["complete", "complete"] and manifest["status"] == "complete"
    assert manifest["totals"]["images_labelled"] == 10 and manifest["totals"]["duplicates_ignored"] == 1


def test_runs_in_threads_lose_nothing(tmp_path):
    out = LabelOutput(str(tmp_path / "out"))
    halves = [[f"/in/{h}{i}.jpg" for i in range(40)] for h in "ab"]
    threads = [threading.Thread(target=label_run, args=(out, f"run-{h}", keys)) for h, keys in zip("ab", halves)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(out.read(LABELS)["key"].to_pylist()) == sorted(halves[0] + halves[1])
    assert out.read(ERRORS).num_rows == 0 and len(out.read_manifest()["runs"]) == 2


def test_the_manifest_is_created_once(tmp_path):
    path = str(tmp_path / "m.json")
    outcomes = []
    threads = [threading.Thread(target=lambda i=i: outcomes.append(storage.create_new(path, f"{i}".encode())))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == [False] * 7 + [True] and len(list(tmp_path.iterdir())) == 1


def test_a_second_model_racing_into_a_new_output_is_refused(tmp_path):
    out = LabelOutput(str(tmp_path / "out"))
    out.create_manifest(new_manifest(MODEL, SETTINGS))  # the other run created it between our read and write
    with pytest.raises(ValueError, match="model sha256 'aa' \\(now 'bb'\\)"):
        ManifestRun.start(out, dict(MODEL, sha256="bb"), SETTINGS, "folder", label_run="late", input="x")


def test_an_output_keyed_by_typed_paths_refuses_folders_and_keeps_its_runs(tmp_path):
    out = LabelOutput(str(tmp_path / "out"))
    legacy = new_manifest(MODEL, SETTINGS)
    del legacy["key_format"]
    legacy.update(status="complete", totals={"images_labelled": 3}, runs=[{"label_run": "old", "status": "complete",
                                                                         "started": "2026-01-01T00:00:00Z"}])
    storage.write_bytes_atomic(f"{out.root}/manifest.json", json.dumps(legacy).encode())
    with pytest.raises(ValueError, match="keyed folder images by their path as typed.*new --output"):
        ManifestRun.start(out, MODEL, SETTINGS, "folder", label_run="new", input="photos/")
    ManifestRun.start(out, MODEL, SETTINGS, "coco", label_run="new", input="data.json")  # its keys did not change
    manifest = out.read_manifest()
    assert [r["label_run"] for r in manifest["runs"]] == ["old", "new"] and manifest["status"] == "running"
    assert manifest["totals"] == {"images_labelled": 3}


def test_keys_are_one_spelling_of_the_path(tmp_path, monkeypatch):
    from messy_data import write_unsafe_tar
    from pipelines.sources import iter_records, open_source

    (tmp_path / "a").mkdir()
    write_unsafe_tar(str(tmp_path / "a" / "x.tar"))
    monkeypatch.chdir(tmp_path / "a")
    relative = {r["key"] for r in iter_records(open_source("x.tar"))}
    monkeypatch.chdir(tmp_path)
    spelled = {r["key"] for r in iter_records(open_source("./a/../a//x.tar"))}
    absolute = {r["key"] for r in iter_records(open_source(str(tmp_path / "a" / "x.tar")))}
    assert relative == spelled == absolute and all(k.startswith(str(tmp_path / "a" / "x.tar!")) for k in absolute)
