"""Labelling without Ray: exactly-once commits, resumption, grouping, filters, the COCO export."""
from __future__ import annotations

import json
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
import torch

from messy_data import encode, rgb_image
from pipelines.labelling.coco_export import write_coco_results
from pipelines.labelling.key_digests import KeyDigestSet, key_digests
from pipelines.labelling.manifest import check_compatible, new_manifest
from pipelines.labelling.options import LabelOptions, parse_classes
from pipelines.labelling.output import ERRORS, LABELS, STALE_TEMPORARY_SECONDS, LabelOutput, part_name
from pipelines.labelling.predictor import select_detections
from pipelines.labelling.prepare import pixels_array, prepare_batch
from pipelines.labelling.schema import LABEL_SCHEMA, RESULT_SCHEMA
from pipelines.labelling.shapes import padding_groups, padding_waste
from pipelines.labelling.writer import ChunkWriter, ModelIdentity
from pipelines.sources.records import make_record, records_table
from pipelines.training.transforms import TransformsConfig
from pipelines.validation.errors import ErrorRecord

MODEL = ModelIdentity("shapes", "3", "run-abc")


def results(keys, errors=(), detections=2):
    """A RESULT_SCHEMA table: `keys` labelled with `detections` boxes each, `errors` unreadable."""
    rows = [{"key": k, "source": "src", "image_id": i, "width": 64, "height": 48, "content_hash": f"h{k}",
             "boxes": [[1.0, 2.0, 11.0, 22.0]] * detections, "scores": [0.9] * detections,
             "labels": [3] * detections, "label_names": ["car"] * detections,
             "error_reason": "", "error_detail": "", "preview_png": None} for i, k in enumerate(keys)]
    rows += [{"key": k, "source": "src", "image_id": 0, "width": 0, "height": 0, "content_hash": "",
              "boxes": [], "scores": [], "labels": [], "label_names": [], "error_reason": "decode_error",
              "error_detail": f"{k}: broken", "preview_png": None} for k in errors]
    return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)


def writer_for(out: LabelOutput, rows_per_file=3, draw=0) -> ChunkWriter:
    return ChunkWriter(out, out.scan(), MODEL, "run-1", rows_per_file=rows_per_file, commit_seconds=3600, draw=draw)


def test_key_digest_set_knows_keys_and_first_occurrences():
    keys = KeyDigestSet(key_digests(["a", "b"]))
    assert keys.contains(key_digests(["a", "c"])).tolist() == [True, False]
    assert keys.add_new(key_digests(["c", "a", "c", "d"])).tolist() == [True, False, False, True]
    assert len(keys) == 4 and len(keys.sorted_array()) == 4
    assert keys.contains(key_digests(["d", "e"])).tolist() == [True, False]


def test_padding_groups_split_portrait_from_landscape():
    shapes = [(240, 320), (320, 240), (240, 320), (320, 240), (240, 300)]
    assert padding_waste(shapes) > 0.25  # one batch of both orientations: over a quarter of it padding
    groups = padding_groups(shapes, max_waste=0.25)
    assert groups == [[4, 0, 2], [1, 3]]
    assert all(padding_waste([shapes[i] for i in g]) <= 0.25 for g in groups)


def test_writer_commits_each_key_once_in_atomic_parts_and_resumes(tmp_path):
    out = LabelOutput(str(tmp_path / "out"))
    writer = writer_for(out)
    writer.add(results(["a", "b"], errors=["x"]))  # 3 rows buffered: committed as part 0
    writer.add(results(["b", "c"]))  # "b" is a duplicate within the run: dropped
    writer.flush()
    assert [n for n, _ in out.parts(LABELS)] == [0, 1] and [n for n, _ in out.parts(ERRORS)] == [0]
    assert writer.counts.labelled == 3 and writer.counts.errors == 1 and writer.counts.duplicates_dropped == 1
    labels = out.read(LABELS)
    assert labels.schema.equals(LABEL_SCHEMA) and sorted(labels["key"].to_pylist()) == ["a", "b", "c"]
    row = labels.to_pylist()[0]
    assert (row["model_name"], row["model_version"], row["model_run_id"], row["label_run"]) == \
        ("shapes", "3", "run-abc", "run-1")
    assert out.read(ERRORS).to_pylist() == [{"source": "src", "image": "x", "reason": "decode_error",
                                             "detail": "x: broken"}]

    # A run killed while writing leaves a hidden temporary part: readers skip it, a later run removes it once it
    # is older than any write in progress (a younger one may be a concurrent run's).
    stale = tmp_path / "out" / LABELS / f".{part_name(2)}.tmp-deadbeef"
    stale.write_bytes(b"PAR1 half a file")
    assert sorted(pads.dataset(str(tmp_path / "out" / LABELS)).to_table()["key"].to_pylist()) == ["a", "b", "c"]
    assert out.remove_temporaries() == 0 and stale.exists()
    os.utime(stale, (time.time() - STALE_TEMPORARY_SECONDS - 1,) * 2)
    assert out.remove_temporaries() == 1 and not stale.exists()

    # Resuming: everything committed (labels and errors) is known, and never written again.
    committed = out.scan()
    assert (committed.labelled, committed.errors, committed.detections, committed.next_part) == (3, 1, 6, 2)
    again = ChunkWriter(out, committed, MODEL, "run-2", rows_per_file=100, commit_seconds=3600, draw=0)
    again.add(results(["a", "d"], errors=["x", "y"]))
    again.flush()
    assert again.counts.labelled == 1 and again.counts.errors == 1 and again.counts.duplicates_dropped == 2
    assert [n for n, _ in out.parts(LABELS)] == [0, 1, 2]
    assert sorted(out.read(LABELS)["key"].to_pylist()) == ["a", "b", "c", "d"]
    assert sorted(out.read(ERRORS)["image"].to_pylist()) == ["x", "y"]


def test_writer_commits_when_commit_seconds_have_passed(tmp_path):
    out = LabelOutput(str(tmp_path / "out"))
    writer = ChunkWriter(out, out.scan(), MODEL, "run-1", rows_per_file=1000, commit_seconds=0.0, draw=0)
    writer.add(results(["a"]))
    writer.add(results(["b"], errors=["x"]))
    assert [n for n, _ in out.parts(LABELS)] == [0, 1] and [n for n, _ in out.parts(ERRORS)] == [1]


def test_readers_defend_against_a_key_in_two_parts(tmp_path):
    out = LabelOutput(str(tmp_path / "out"))
    writer = writer_for(out, rows_per_file=1)
    writer.add(results(["a", "b"]))
    # A part copied in by hand repeats "a" (a different detection count) and holds "b" as an error too.
    first = out.read(LABELS).filter(pa.compute.equal(out.read(LABELS)["key"], "a"))
    out.commit(5, first.set_column(first.schema.get_field_index("label_run"), "label_run", pa.array(["copy"])),
               pa.table({"source": ["s"], "image": ["b"], "reason": ["decode_error"], "detail": [""]}))
    committed = out.scan()
    assert committed.labelled == 2 and committed.errors == 0 and committed.duplicates_ignored == 2
    labels = out.read(LABELS)
    assert sorted(labels["key"].to_pylist()) == ["a", "b"] and "copy" not in labels["label_run"].to_pylist()
    assert out.read(ERRORS).num_rows == 0


def test_planning_errors_and_previews_are_written_once(tmp_path):
    out = LabelOutput(str(tmp_path / "out"))
    writer = writer_for(out, draw=1)
    writer.add_errors([ErrorRecord("labels.json", "gone.jpg", "read_error", "missing")])
    table = results(["dir/a.jpg", "dir/b.jpg"])
    png = encode(rgb_image(), "PNG")
    table = table.set_column(table.schema.get_field_index("preview_png"), "preview_png",
                             pa.array([png, png], pa.binary()))
    writer.add(table)
    writer.flush()
    assert os.listdir(tmp_path / "out" / "previews") == ["a-0.png"] and writer.counts.previews == 1
    again = writer_for(out, draw=1)  # the preview already there counts toward --draw
    assert again.previews_left == 0
    again.add_errors([ErrorRecord("labels.json", "gone.jpg", "read_error", "missing")])
    again.flush()
    assert out.read(ERRORS)["image"].to_pylist() == ["gone.jpg"]


def test_coco_results_export_every_committed_detection(tmp_path):
    out = LabelOutput(str(tmp_path / "out"))
    writer = writer_for(out, rows_per_file=1)
    writer.add(results(["a", "b"], errors=["x"]))
    writer.flush()
    path = str(tmp_path / "coco.json")
    assert write_coco_results(out, path) == 4
    items = json.load(open(path))
    assert len(items) == 4 and items[0]["bbox"] == [1.0, 2.0, 10.0, 20.0] and items[0]["category_id"] == 3
    assert {i["image_id"] for i in items} == {0, 1} and items[0]["score"] == pytest.approx(0.9, abs=1e-5)


def test_manifest_refuses_another_model_or_other_settings():
    model = {"name": "m", "version": "1", "run_id": "r", "sha256": "aa"}
    settings = LabelOptions(score_threshold=0.5).row_settings()
    manifest = new_manifest(model, settings)
    check_compatible(None, model, settings, "out")
    check_compatible(manifest, model, settings, "out")
    with pytest.raises(ValueError, match="model version '1' \\(now '2'\\)"):
        check_compatible(manifest, dict(model, version="2"), settings, "out")
    with pytest.raises(ValueError, match="score_threshold 0.5 \\(now 0.7\\)"):
        check_compatible(manifest, model, LabelOptions(score_threshold=0.7).row_settings(), "out")


def test_the_evaluation_size_is_the_models_unless_given_and_a_resumed_output_keeps_it():
    from pipelines.training.transforms import TransformsConfig

    small = TransformsConfig.small()  # evaluates at 128, longer side at most 213
    assert (small.at_eval_size(96).eval_size, small.at_eval_size(96).eval_max_size) == (96, 160)  # the ratio kept
    assert small.at_eval_size(96, 120).eval_max_size == 120
    with pytest.raises(ValueError, match="evaluation size 0"):
        small.at_eval_size(0)
    with pytest.raises(ValueError, match="eval_max_size needs eval_size"):
        LabelOptions(eval_max_size=300)
    own = LabelOptions().for_model(0.5, small)
    assert (own.eval_size, own.eval_max_size) == (128, 213) and own.transforms(small) == small
    smaller = LabelOptions(eval_size=96).for_model(0.5, small)
    assert smaller.row_settings()["eval_size"] == 96 and smaller.transforms(small).eval_max_size == 160

    model = {"name": "m", "version": "1", "run_id": "r", "sha256": "aa"}
    check_compatible(new_manifest(model, own.row_settings()), model, own.row_settings(), "out")
    with pytest.raises(ValueError, match="eval_size 128 \\(now 96\\)"):
        check_compatible(new_manifest(model, own.row_settings()), model, smaller.row_settings(), "out")
    # An output labelled before the size was recorded was labelled at the model's own size.
    legacy = new_manifest(model, {k: v for k, v in own.row_settings().items() if not k.startswith("eval_")})
    own_size = {"eval_size": 128, "eval_max_size": 213}
    check_compatible(legacy, model, own.row_settings(), "out", own_size)
    with pytest.raises(ValueError, match="eval_size 128 \\(now 96\\)"):
        check_compatible(legacy, model, smaller.row_settings(), "out", own_size)


def test_classes_by_name_or_id_and_clear_errors():
    categories = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
    assert parse_classes("Person, 3", categories) == (1, 3)
    assert parse_classes(None, categories) is None
    with pytest.raises(ValueError, match="no class 'truck'.*car, person"):
        parse_classes("car,truck", categories)
    assert parse_classes("7", None) == (7,)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        LabelOptions(top_k=0)


def test_select_detections_filters_classes_before_top_k():
    det = {"scores": torch.tensor([0.2, 0.9, 0.5, 0.7]), "labels": torch.tensor([1, 2, 1, 1]),
           "boxes": torch.arange(16, dtype=torch.float32).reshape(4, 4)}
    kept = select_detections(det, classes=[1], top_k=2)
    assert kept["scores"].tolist() == pytest.approx([0.7, 0.5]) and kept["labels"].tolist() == [1, 1]
    assert kept["boxes"].tolist() == [det["boxes"][3].tolist(), det["boxes"][2].tolist()]
    assert select_detections(det, None, None)["scores"].tolist() == pytest.approx([0.9, 0.7, 0.5, 0.2])
    clipped = select_detections({"boxes": torch.tensor([[-8.0, 2.0, 50.0, 70.0]]), "scores": torch.tensor([0.9]),
                                 "labels": torch.tensor([1])}, None, None, size=(60, 40))
    assert clipped["boxes"].tolist() == [[0.0, 2.0, 40.0, 60.0]]  # inside the image of height 60, width 40


def test_prepare_skips_committed_keys_decodes_resizes_and_orders_by_shape():
    wide, tall = encode(rgb_image(1, (48, 64)), "PNG"), encode(rgb_image(2, (64, 48)), "PNG")
    records = records_table([make_record("tall.png", data=tall), make_record("wide.png", data=wide),
                             make_record("done.png", data=wide), make_record("bad.jpg", data=b"not an image")])
    transforms = TransformsConfig.small()
    out = prepare_batch(records, done=np.sort(key_digests(["done.png"])), transforms=transforms)
    rows = out.to_pylist()
    assert [r["key"] for r in rows] == ["bad.jpg", "wide.png", "tall.png"]  # errors first, then by height
    assert rows[0]["error_reason"] == "not_an_image" and rows[0]["pixels"] == b""
    wide_row = rows[1]
    assert (wide_row["height"], wide_row["width"]) == (48, 64)
    assert min(wide_row["input_height"], wide_row["input_width"]) == transforms.eval_size
    import hashlib

    from pipelines.inference.detector import EvalPreprocessing
    from pipelines.validation.decode import decode_image

    assert wide_row["content_hash"] == hashlib.sha256(wide).hexdigest()
    expected = EvalPreprocessing(transforms).resize(decode_image(wide, "wide.png").array).numpy()
    np.testing.assert_array_equal(pixels_array(wide_row["pixels"], wide_row["input_height"],
                                               wide_row["input_width"]), expected)


def test_layouts_the_cluster_cannot_run_are_refused_with_a_way_out():
    from pipelines.labelling.pipeline import check_cluster_fits

    check_cluster_fits(LabelOptions(concurrency=2), 0.0, {"CPU": 4.0})
    check_cluster_fits(LabelOptions(concurrency=2, cpus_per_actor=0.5), 0.0, {"CPU": 2.0})
    with pytest.raises(ValueError, match="leave no CPU for reading.*--cpus-per-actor 0.5"):
        check_cluster_fits(LabelOptions(concurrency=2), 0.0, {"CPU": 2.0})
    with pytest.raises(ValueError, match="need 4 GPUs; the cluster has 2"):
        check_cluster_fits(LabelOptions(concurrency=4), 1.0, {"CPU": 32.0, "GPU": 2.0})


def test_a_glob_of_archives_is_read_as_archives(tmp_path):
    from messy_data import write_unsafe_tar
    from pipelines.sources import detect_kind, iter_records, open_source

    for name in ("a.tar", "b.tar"):
        write_unsafe_tar(str(tmp_path / name))
    pattern = str(tmp_path / "*.tar")
    assert detect_kind(pattern) == "archive"
    keys = [r["key"] for r in iter_records(open_source(pattern)) if not r["error_reason"]]
    assert keys == [f"{tmp_path}/{a}!{m}" for a in ("a.tar", "b.tar") for m in ("a/one.png", "two.jpg")]


def test_other_bytes_under_a_labelled_key_are_reported_not_skipped():
    import hashlib

    from pipelines.labelling.key_digests import content_digests

    old, new = encode(rgb_image(1), "PNG"), encode(rgb_image(2), "PNG")
    records = records_table([make_record("a.tar!same.png", source="a.tar", data=old),
                             make_record("a.tar!swapped.png", source="a.tar", data=new),
                             make_record("a.tar!was_broken.png", source="a.tar", data=new)])
    keys = ["a.tar!same.png", "a.tar!swapped.png"]  # labelled from `old`; was_broken.png was an error row
    done = np.sort(key_digests(keys + ["a.tar!was_broken.png"]))
    out = prepare_batch(records, done=done, transforms=TransformsConfig.small(), labelled=np.sort(key_digests(keys)),
                        contents=np.sort(content_digests(keys, [hashlib.sha256(old).hexdigest()] * 2)))
    digest = hashlib.sha256(new).hexdigest()
    assert out["key"].to_pylist() == [f"a.tar!swapped.png#sha256={digest[:16]}"]
    assert out["error_reason"].to_pylist() == ["changed_since_labelled"] and out["content_hash"][0].as_py() == digest
