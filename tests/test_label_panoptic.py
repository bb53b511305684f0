"""`detr label --task panoptic` without Ray: the segment rows and PNGs, the actor, the writer's order of
writes, the COCO panoptic export, and the settings a re-run must keep."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from detr import masks_to_rle
from messy_data import corrupt_jpeg
from panoptic_model import CATEGORIES, panoptic_images, save_tiny_panoptic
from pipelines.inference.detector import Detector
from pipelines.inference.panoptic import segment_images
from pipelines.labelling.key_digests import key_digests
from pipelines.labelling.manifest import check_compatible, new_manifest
from pipelines.labelling.options import LabelOptions
from pipelines.labelling.output import LABELS, PANOPTIC, LabelOutput, part_name
from pipelines.labelling.panoptic_export import write_coco_panoptic
from pipelines.labelling.panoptic_predictor import PanopticLabelPredictor
from pipelines.labelling.prepare import prepare_batch
from pipelines.labelling.schema import PANOPTIC_LABEL_SCHEMA, PANOPTIC_RESULT_SCHEMA
from pipelines.labelling.segments import id_map_from_segments, segment_masks, segment_row, segments_array
from pipelines.labelling.writer import ChunkWriter, ModelIdentity
from pipelines.sources.records import make_record, records_table
from pipelines.training.transforms import TransformsConfig
from pipelines.validation.decode import decode_image
from pipelines.validation.panoptic import decode_panoptic_png, encode_panoptic_png

ID_MAP = np.array([[1, 1, 2, 2, 2], [1, 1, 2, 258, 258], [3, 3, 3, 258, 258], [3, 3, 3, 3, 258]], dtype=np.int64)


def segments_of(id_map: np.ndarray) -> list[dict]:
    """Segments as `segment_preprocessed` gives them, for a hand-made id map."""
    ids = sorted(set(id_map.flatten().tolist()) - {0})
    masks = np.stack([id_map == i for i in ids])
    return [{"id": i, "category_id": 3 if i == 3 else 1, "label_name": "sky" if i == 3 else "circle",
             "isthing": i != 3, "area": int(m.sum()), "score": 0.5 + i / 1000, "bbox": [0, 0, 1, 1], "rle": rle}
            for i, m, rle in zip(ids, masks, masks_to_rle(masks))]


def test_segment_rows_survive_parquet_and_describe_the_same_ids_as_the_png(tmp_path):
    segments = segments_of(ID_MAP)
    table = pa.table({"segments": segments_array([segments, None])})
    pq.write_table(table, tmp_path / "t.parquet")
    rows = pq.read_table(tmp_path / "t.parquet")["segments"].to_pylist()
    assert rows[1] == []  # an error row has no segments
    assert [(s["id"], s["category_id"], s["isthing"], s["area"]) for s in rows[0]] == \
        [(1, 1, True, 4), (2, 1, True, 4), (3, 3, False, 7), (258, 1, True, 5)]
    assert rows[0][0]["rle"]["size"] == [4, 5] and isinstance(rows[0][0]["rle"]["counts"], str)
    assert [int(m.sum()) for m in segment_masks(rows[0])] == [4, 4, 7, 5]
    np.testing.assert_array_equal(id_map_from_segments(rows[0], 4, 5), ID_MAP)
    # COCO panoptic encoding: id = R + 256 G + 256^2 B (segment 258 is R=2, G=1).
    png = encode_panoptic_png(ID_MAP)
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert rgb[1, 3].tolist() == [2, 1, 0] and rgb[2, 0].tolist() == [3, 0, 0]
    np.testing.assert_array_equal(decode_panoptic_png(png), ID_MAP)


@pytest.fixture(scope="module")
def panoptic_checkpoint(tmp_path_factory) -> str:
    return save_tiny_panoptic(tmp_path_factory.mktemp("model") / "pan.pt", TransformsConfig.small())


def test_the_actor_returns_the_segments_and_png_of_a_direct_call(panoptic_checkpoint, tmp_path):
    images = panoptic_images(tmp_path / "shapes")[:3]
    records = records_table([make_record(str(p), data=p.read_bytes()) for p in images]
                            + [make_record("bad.jpg", data=corrupt_jpeg())])
    prepared = prepare_batch(records, done=np.sort(key_digests([])), transforms=TransformsConfig.small())
    threads = torch.get_num_threads()
    try:  # the actor runs one torch thread; the reference below too: the same arithmetic, bit for bit
        predictor = PanopticLabelPredictor(open(panoptic_checkpoint, "rb").read(), score_threshold=0.5,
                                           panoptic_threshold=0.85, top_k=None, classes=None, threads=1)
        out = predictor(prepared)
        detector = Detector.from_checkpoint(panoptic_checkpoint)
        # One batch of the three, as the actor runs them: the same arithmetic, so even pixels where two
        # queries' masks nearly tie go the same way.
        direct = segment_images(detector, [decode_image(p.read_bytes(), str(p)).array for p in images], 0.85)
        expected = {str(p): result for p, result in zip(images, direct)}
    finally:
        torch.set_num_threads(threads)
    assert out.schema.equals(PANOPTIC_RESULT_SCHEMA)
    rows = {r["key"]: r for r in out.to_pylist()}
    assert rows["bad.jpg"]["error_reason"] and rows["bad.jpg"]["segments"] == [] and \
        rows["bad.jpg"]["panoptic_png"] is None
    assert {s["isthing"] for p in images for s in rows[str(p)]["segments"]} == {True, False}  # things and stuff
    for path in images:
        row, want = rows[str(path)], expected[str(path)]
        assert len(row["segments"]) >= 2
        assert [(s["id"], s["category_id"], s["area"]) for s in row["segments"]] == \
            [(s["id"], s["category_id"], s["area"]) for s in want["segments"]]
        assert [s["label_name"] for s in row["segments"]] == \
            [CATEGORIES[s["category_id"] - 1]["name"] for s in row["segments"]]
        np.testing.assert_array_equal(decode_panoptic_png(row["panoptic_png"]), want["id_map"].numpy())
        np.testing.assert_array_equal(id_map_from_segments(row["segments"], row["height"], row["width"]),
                                      want["id_map"].numpy())
        assert sum(s["area"] for s in row["segments"]) == row["height"] * row["width"]


def panoptic_results(keys: list[str]) -> pa.Table:
    """PANOPTIC_RESULT_SCHEMA rows: `keys` labelled with ID_MAP's segments and PNG."""
    segments, png = [segment_row(s) for s in segments_of(ID_MAP)], encode_panoptic_png(ID_MAP)
    rows = [{"key": k, "source": "src", "image_id": i, "width": 5, "height": 4, "content_hash": f"h{k}",
             "boxes": [[0.0, 0.0, 2.0, 2.0]], "scores": [0.9], "labels": [1], "label_names": ["circle"],
             "error_reason": "", "error_detail": "", "preview_png": None, "segments": segments, "panoptic_png": png}
            for i, k in enumerate(keys)]
    return pa.Table.from_pylist(rows, schema=PANOPTIC_RESULT_SCHEMA)


def test_writer_writes_each_png_before_its_row_is_committed_and_resumes(tmp_path):
    out = LabelOutput(str(tmp_path / "out"))
    writer = ChunkWriter(out, out.scan(), ModelIdentity("pan"), "run-1", rows_per_file=100, commit_seconds=3600, draw=0)
    writer.add(panoptic_results(["dir/a.png", "dir/b.png"]))
    pngs = tmp_path / "out" / PANOPTIC
    assert sorted(os.listdir(pngs)) == ["a-0.png", "b-1.png"] and not out.parts(LABELS)  # PNGs first, rows later
    writer.flush()
    assert writer.counts.segments == 8 and writer.counts.labelled == 2
    labels = out.read(LABELS)
    assert labels.schema.equals(PANOPTIC_LABEL_SCHEMA)
    row = labels.to_pylist()[0]
    assert row["panoptic_file"] == "panoptic/a-0.png" and len(row["segments"]) == 4
    np.testing.assert_array_equal(decode_panoptic_png((tmp_path / "out" / row["panoptic_file"]).read_bytes()),
                                  id_map_from_segments(row["segments"], 4, 5))

    # A killed run left a PNG whose row it never committed, and half of another PNG under a hidden name.
    (pngs / "c-1.png").write_bytes(b"half a PNG")
    (pngs / ".c-1.png.tmp-0badf00d").write_bytes(b"half")
    assert out.remove_temporaries(older_than=0) == 1
    stamp = (pngs / "a-0.png").stat().st_mtime_ns
    again = ChunkWriter(out, out.scan(), ModelIdentity("pan"), "run-2", rows_per_file=100, commit_seconds=3600,
                        draw=0)
    again.add(panoptic_results(["dir/a.png", "dir/c.png"]))  # "a" is committed: dropped, its PNG untouched
    again.flush()
    assert again.counts.labelled == 1 and again.counts.duplicates_dropped == 1
    assert (pngs / "a-0.png").stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(decode_panoptic_png((pngs / "c-1.png").read_bytes()), ID_MAP)
    assert [n for n, _ in out.parts(LABELS)] == [0, 1] and part_name(1, "run2") in os.listdir(tmp_path / "out" / LABELS)

    path = tmp_path / "panoptic.json"
    assert write_coco_panoptic(out, str(path), CATEGORIES) == 3
    coco = json.loads(path.read_text())
    assert [c["isthing"] for c in coco["categories"]] == [1, 1, 0, 0]
    assert [i["file_name"] for i in coco["images"]] == ["dir/a.png", "dir/b.png", "dir/c.png"]
    annotation = coco["annotations"][2]
    assert annotation["file_name"] == "c-1.png" and (pngs / annotation["file_name"]).exists()
    assert [(s["id"], s["category_id"], s["area"], s["iscrowd"]) for s in annotation["segments_info"]] == \
        [(1, 1, 4, 0), (2, 1, 4, 0), (3, 3, 7, 0), (258, 1, 5, 0)]


def test_the_task_is_a_row_setting_a_rerun_must_keep():
    model = {"name": "m", "version": "1", "run_id": "r", "sha256": "aa"}
    # As the job records them: the model's threshold and evaluation size.
    detection = LabelOptions().for_model(0.5, TransformsConfig.small()).row_settings()
    panoptic = LabelOptions(task="panoptic").for_model(0.5, TransformsConfig.small()).row_settings()
    assert detection == {"task": "detection", "score_threshold": 0.5, "top_k": None, "classes": None,
                         "precision": "float32", "runtime": "torch", "eval_size": 128, "eval_max_size": 213}
    assert panoptic == {**detection, "task": "panoptic", "panoptic_threshold": 0.85}
    with pytest.raises(ValueError, match="task 'detection' \\(now 'panoptic'\\)"):
        check_compatible(new_manifest(model, detection), model, panoptic, "out")
    with pytest.raises(ValueError, match="task 'panoptic' \\(now 'detection'\\).*panoptic_threshold 0.85 \\(now None"):
        check_compatible(new_manifest(model, panoptic), model, detection, "out")
    with pytest.raises(ValueError, match="panoptic_threshold 0.85 \\(now 0.5\\)"):
        check_compatible(new_manifest(model, panoptic), model,
                         LabelOptions(task="panoptic", panoptic_threshold=0.5).row_settings(), "out")
    with pytest.raises(ValueError, match="precision 'float32' \\(now 'bfloat16'\\)"):
        check_compatible(new_manifest(model, detection), model,
                         LabelOptions(precision="bfloat16").for_model(0.5, TransformsConfig.small()).row_settings(),
                         "out")
    # An output labelled before tasks and precisions were recorded holds float32 detections: it resumes as such.
    legacy = new_manifest(model, {k: v for k, v in detection.items() if k not in ("task", "precision")})
    check_compatible(legacy, model, detection, "out")
    with pytest.raises(ValueError, match="task 'detection' \\(now 'panoptic'\\)"):
        check_compatible(legacy, model, panoptic, "out")
    with pytest.raises(ValueError, match="precision 'float32' \\(now 'bfloat16'\\)"):
        check_compatible(legacy, model,
                         LabelOptions(precision="bfloat16").for_model(0.5, TransformsConfig.small()).row_settings(),
                         "out")
    with pytest.raises(ValueError, match="task must be one of detection, panoptic"):
        LabelOptions(task="instances")
    with pytest.raises(ValueError, match="precision must be one of float32, bfloat16"):
        LabelOptions(precision="float16")


def test_panoptic_task_with_a_model_without_masks_fails_at_once(ray_cluster, tmp_path, capsys):
    from jobs.cli import main as detr_cli

    checkpoint = save_tiny_panoptic(tmp_path / "boxes-only.pt", TransformsConfig.small(), masks=False)
    (tmp_path / "photos").mkdir()  # the input is checked first, then the model
    argv = ["label", "--model", checkpoint, "--input", str(tmp_path / "photos"), "--output", str(tmp_path / "o")]
    assert detr_cli([*argv, "--task", "panoptic"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and checkpoint in error and "needs a model with a mask head" in error
    assert detr_cli([*argv, "--coco-panoptic-json", str(tmp_path / "p.json")]) == 1
    assert "--coco-panoptic-json needs --task panoptic" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before anything was written
