"""Sources on real files: YOLO, VOC, folders and globs, tar/zip archives (unsafe members rejected)."""
from __future__ import annotations

import json
import os
import zipfile

import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs.cli import main as detr
from messy_data import encode, rgb_image, write_unsafe_tar
from pipelines.loading import load_record
from pipelines.sources import detect_kind, open_source


def write_yolo(root):
    os.makedirs(root / "images" / "train")
    os.makedirs(root / "labels" / "train")
    (root / "classes.txt").write_text("red\nblue\n")
    (root / "images" / "train" / "a.jpg").write_bytes(encode(rgb_image(1), "JPEG"))  # 64x48
    (root / "images" / "train" / "b.png").write_bytes(encode(rgb_image(2), "PNG"))  # no label file: negative
    (root / "images" / "train" / "c.jpg").write_bytes(b"")  # unreadable
    (root / "labels" / "train" / "a.txt").write_text(
        "0 0.25 0.3125 0.25 0.2083333\n"  # the red rectangle x 8..24, y 10..20
        "1 0.5 0.5 0.1 0.1 0.2\n"  # wrong field count
        "7 0.5 0.5 0.1 0.1\n"  # class out of range
        "1 0.1 0.1 0.3 0.1 0.3 0.3\n"  # a polygon: its extent
    )


def test_yolo_source_and_convert_command(tmp_path, capsys):
    root = tmp_path / "yolo"
    write_yolo(root)
    assert detect_kind(str(root)) == "yolo"
    out = tmp_path / "coco.json"
    assert detr(["convert", "yolo", str(root), str(out)]) == 0
    coco = json.loads(out.read_text())
    assert [c["name"] for c in coco["categories"]] == ["red", "blue"] and coco["categories"][0]["id"] == 1
    assert [im["file_name"] for im in coco["images"]] == ["train/a.jpg", "train/b.png"]
    anns = coco["annotations"]
    assert [a["category_id"] for a in anns] == [1, 2]
    np.testing.assert_allclose(anns[0]["bbox"], [8, 10, 16, 10], atol=0.01)
    np.testing.assert_allclose(anns[1]["bbox"], [6.4, 4.8, 12.8, 9.6], atol=0.01)
    errors = pq.read_table(tmp_path / "coco.errors.parquet").to_pylist()
    assert sorted(e["reason"] for e in errors) == ["bad_label_file", "unknown_category", "zero_byte"]
    assert any("a.txt:2" in e["detail"] for e in errors)
    assert "2 images, 2 annotations" in capsys.readouterr().out
    source = open_source(str(root))
    records = list(source.iter_records())
    assert [r["key"] for r in records] == ["train/a.jpg", "train/b.png"] and len(source.planning_errors) == 3
    loaded, errs = load_record(records[0], source.category_ids)
    assert errs == [] and loaded.annotations.category_ids.tolist() == [1, 2]


def test_voc_source(tmp_path):
    root = tmp_path / "voc"
    os.makedirs(root / "Annotations")
    os.makedirs(root / "JPEGImages")
    (root / "JPEGImages" / "x.jpg").write_bytes(encode(rgb_image(1), "JPEG"))
    (root / "Annotations" / "x.xml").write_text(
        "<annotation><filename>x.jpg</filename><size><width>64</width><height>48</height></size>"
        "<object><name>dog</name><difficult>0</difficult><bndbox><xmin>9</xmin><ymin>11</ymin><xmax>24</xmax><ymax>20</ymax></bndbox></object>"
        "<object><name>cat</name><difficult>1</difficult><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>10</xmax><ymax>10</ymax></bndbox></object>"
        "<object><name>cat</name><bndbox><xmin>a</xmin><ymin>1</ymin><xmax>10</xmax><ymax>10</ymax></bndbox></object>"
        "</annotation>")
    (root / "Annotations" / "broken.xml").write_text("<annotation><filename>")
    source = open_source(str(root))
    assert source.kind == "voc" and [c["name"] for c in source.categories] == ["cat", "dog"]
    assert sorted(e.reason for e in source.planning_errors) == ["bad_label_file", "bad_label_file"]
    (record,) = list(source.iter_records())
    loaded, errs = load_record(record, source.category_ids)
    np.testing.assert_allclose(loaded.annotations.boxes, [[8, 10, 16, 10], [0, 0, 10, 10]])
    assert loaded.annotations.category_ids.tolist() == [2, 1] and loaded.annotations.iscrowd.tolist() == [0, 1]


def test_folder_and_glob(tmp_path):
    for name in ("b/2.png", "a/1.jpg", "a/notes.txt", "c.JPG"):
        os.makedirs(tmp_path / os.path.dirname(name), exist_ok=True)
        (tmp_path / name).write_bytes(encode(rgb_image(0), "PNG"))
    keys = [r["key"] for r in open_source(str(tmp_path)).iter_records()]
    assert keys == [str(tmp_path / n) for n in ("a/1.jpg", "b/2.png", "c.JPG")]
    glob_keys = [r["key"] for r in open_source(str(tmp_path / "*" / "*.png")).iter_records()]
    assert glob_keys == [str(tmp_path / "b/2.png")]
    assert all(r["has_annotations"] is False for r in open_source(str(tmp_path)).iter_records())


@pytest.mark.parametrize("name", ["imgs.tar", "imgs.tar.gz"])
def test_tar_streams_members_and_rejects_unsafe_ones(tmp_path, name):
    path = str(tmp_path / name)
    good = write_unsafe_tar(path)
    records = list(open_source(path).iter_records())
    ok = [r for r in records if not r["error_reason"]]
    bad = {r["key"].split("!", 1)[1]: r["error_reason"] for r in records if r["error_reason"]}
    assert sorted(r["key"] for r in ok) == [f"{path}!{m}" for m in good]
    assert bad == {"../escape.jpg": "unsafe_archive_member", "/abs/evil.png": "unsafe_archive_member",
                   "link.jpg": "unsafe_archive_member"}
    for r in ok:
        loaded, errs = load_record(r)
        assert errs == [] and loaded.image.array.shape == (48, 64, 3)
    loaded, errs = load_record([r for r in records if r["error_reason"]][0])
    assert loaded is None and errs[0].reason == "unsafe_archive_member" and path in errs[0].detail


def test_zip_members(tmp_path):
    path = str(tmp_path / "imgs.zip")
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("in/one.png", encode(rgb_image(1), "PNG"))
        zf.writestr("../up.png", encode(rgb_image(1), "PNG"))
        zf.writestr("readme.md", "skip me")
    records = list(open_source(path).iter_records())
    assert [(r["key"], r["error_reason"]) for r in records] == [
        (f"{path}!in/one.png", ""), (f"{path}!../up.png", "unsafe_archive_member")]
    assert records[0]["bytes"] == encode(rgb_image(1), "PNG")


def test_bad_coco_json_names_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        open_source(str(bad))
