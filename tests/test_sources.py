"""Sources on real files: YOLO, VOC, folders and globs (planned, or listed as they are read, locally and on an
S3-compatible store), tar/zip archives (unsafe members rejected)."""
from __future__ import annotations

import json
import os
import pickle
import zipfile

import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs.cli import main as detr
from messy_data import encode, rgb_image, write_unsafe_tar
from pipelines.sources import FolderOfArchives, detect_kind, iter_records, iter_unit_records, open_source
from pipelines.sources.folder import open_folder
from pipelines.storage import IMAGE_EXTENSIONS, FolderListing, list_files
from pipelines.validation.loading import load_record


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
    # The images lie under the JSON's folder: their names are relative to it, so the JSON reads as it is.
    assert [im["file_name"] for im in coco["images"]] == ["yolo/images/train/a.jpg", "yolo/images/train/b.png"]
    anns = coco["annotations"]
    assert [a["category_id"] for a in anns] == [1, 2]
    np.testing.assert_allclose(anns[0]["bbox"], [8, 10, 16, 10], atol=0.01)
    np.testing.assert_allclose(anns[1]["bbox"], [6.4, 4.8, 12.8, 9.6], atol=0.01)
    errors = pq.read_table(tmp_path / "coco.errors.parquet").to_pylist()
    # A bad line drops its box, not its image: an annotation-level reason, so images add up.
    assert sorted(e["reason"] for e in errors) == ["malformed_annotation", "unknown_category", "zero_byte"]
    assert any("a.txt:2" in e["detail"] for e in errors)
    printed = capsys.readouterr().out
    assert "2 images, 2 annotations" in printed and "relative to its own folder" in printed
    converted = list(iter_records(open_source(str(out))))
    assert [load_record(r, {1, 2})[1] for r in converted] == [[], []]  # both images found and read
    # Written elsewhere, the names stay relative to the images folder, which the jobs must then be given.
    elsewhere = tmp_path / "elsewhere" / "coco.json"
    assert detr(["convert", "yolo", str(root), str(elsewhere)]) == 0
    assert [im["file_name"] for im in json.loads(elsewhere.read_text())["images"]] == ["train/a.jpg", "train/b.png"]
    assert f"relative to {root}/images, outside the JSON's folder: give that as --images" in capsys.readouterr().out
    source = open_source(str(root))
    records = list(iter_records(source))
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
    assert sorted(e.reason for e in source.planning_errors) == ["bad_label_file", "malformed_annotation"]
    (record,) = list(iter_records(source))
    loaded, errs = load_record(record, source.category_ids)
    np.testing.assert_allclose(loaded.annotations.boxes, [[8, 10, 16, 10], [0, 0, 10, 10]])
    assert loaded.annotations.category_ids.tolist() == [2, 1] and loaded.annotations.iscrowd.tolist() == [0, 1]


def test_folder_and_glob(tmp_path):
    for name in ("b/2.png", "a/1.jpg", "a/notes.txt", "c.JPG"):
        os.makedirs(tmp_path / os.path.dirname(name), exist_ok=True)
        (tmp_path / name).write_bytes(encode(rgb_image(0), "PNG"))
    keys = [r["key"] for r in iter_records(open_source(str(tmp_path)))]
    assert keys == [str(tmp_path / n) for n in ("a/1.jpg", "b/2.png", "c.JPG")]
    glob_keys = [r["key"] for r in iter_records(open_source(str(tmp_path / "*" / "*.png")))]
    assert glob_keys == [str(tmp_path / "b/2.png")]
    assert all(r["has_annotations"] is False for r in iter_records(open_source(str(tmp_path))))


@pytest.mark.parametrize("name", ["imgs.tar", "imgs.tar.gz"])
def test_tar_streams_members_and_rejects_unsafe_ones(tmp_path, name):
    path = str(tmp_path / name)
    good = write_unsafe_tar(path)
    records = list(iter_records(open_source(path)))
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
    records = list(iter_records(open_source(path)))
    assert [(r["key"], r["error_reason"]) for r in records] == [
        (f"{path}!in/one.png", ""), (f"{path}!../up.png", "unsafe_archive_member")]
    assert records[0]["bytes"] == encode(rgb_image(1), "PNG")


def test_bad_coco_json_names_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        open_source(str(bad))


# Names whose sorted order a listing made folder by folder could get wrong: `a.jpg` and `a-b.jpg` sort before the
# files under `a/` ('-' and '.' come before '/'), `a0/` after them, and `ab/` after `a0/`.
TREE = ("a.jpg", "a/x.jpg", "a/y/z.png", "a-b.jpg", "a0/q.jpg", "ab/c.jpg", "b/2.png", "c.JPG", "notes.txt",
        "d/e/f/g.gif", "a.b/k.jpg")


def write_tree(root, names=TREE):
    for name in names:
        os.makedirs(root / os.path.dirname(name), exist_ok=True)
        (root / name).write_bytes(encode(rgb_image(len(name)), "PNG"))


@pytest.mark.parametrize("pattern, extensions, recursive", [
    ("", IMAGE_EXTENSIONS, True), ("", None, True), ("", None, False), ("*/*.jpg", None, True),
    ("a*", IMAGE_EXTENSIONS, True), ("a.jpg", None, True)])
def test_a_folder_listing_lazily_lists_what_list_files_lists(tmp_path, pattern, extensions, recursive):
    write_tree(tmp_path)
    path = str(tmp_path / pattern) if pattern else str(tmp_path)
    assert list(FolderListing(path, extensions, recursive)) == list_files(path, extensions, recursive)
    assert list_files(path, extensions, recursive)  # every case lists something


def test_a_folder_listing_lists_each_sub_folder_when_its_turn_comes(tmp_path):
    write_tree(tmp_path)
    listing = FolderListing(str(tmp_path))  # lists the top level only
    assert listing.top_files == [str(tmp_path / n) for n in ("a-b.jpg", "a.jpg", "c.JPG", "notes.txt")]
    (tmp_path / "b" / "3.png").write_bytes(b"x")  # in a sub-folder not listed yet: seen
    (tmp_path / "late.jpg").write_bytes(b"x")  # beside the top-level files already listed: not seen
    names = list(listing)
    assert str(tmp_path / "b" / "3.png") in names and str(tmp_path / "late.jpg") not in names
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        FolderListing(str(tmp_path / "missing"))


def test_a_streamed_folder_reads_the_records_a_planned_one_holds(tmp_path):
    write_tree(tmp_path)
    planned, streamed = open_folder(str(tmp_path)), open_folder(str(tmp_path), stream=True)
    assert [u.kind for u in streamed.units] == ["listing"] and streamed.lists_while_read
    assert not planned.lists_while_read
    assert list(iter_records(streamed)) == list(iter_records(planned))  # same keys, same order, same fields
    unit = pickle.loads(pickle.dumps(streamed.units[0]))  # what a read task receives
    assert [r["key"] for r in iter_unit_records(unit)] == [r["key"] for r in iter_records(planned)]
    with pytest.raises(FileNotFoundError):  # checked when opened, as a planned folder is
        open_folder(str(tmp_path / "missing"), stream=True)


def test_a_streamed_folder_of_archives_says_so_before_any_record(tmp_path):
    (tmp_path / "one.tar").write_bytes(b"")
    (tmp_path / "two.zip").write_bytes(b"")
    assert detect_kind(str(tmp_path)) == "archive" and detect_kind(str(tmp_path), list_folder=False) == "folder"
    guessed = open_folder(str(tmp_path), stream=True, archives_possible=True)
    with pytest.raises(FolderOfArchives) as raised:
        next(iter_records(guessed))
    assert pickle.loads(pickle.dumps(raised.value)).path == str(tmp_path)  # as a Ray task's error reaches the driver
    named = open_folder(str(tmp_path), stream=True)  # --kind folder: archives are not images, nothing to read
    assert list(iter_records(named)) == []
    (tmp_path / "photo.jpg").write_bytes(encode(rgb_image(0), "JPEG"))  # one image among them: a folder
    assert [r["key"] for r in iter_records(guessed)] == [str(tmp_path / "photo.jpg")]


def test_open_source_streams_the_listing_of_object_store_folders_only(tmp_path, monkeypatch, s3_server):
    s3 = s3_server  # the session's S3 server (tests/topology.py)
    write_tree(tmp_path)
    local = open_source(str(tmp_path), stream_listing=True)  # local folders: listed here, as always
    assert {u.kind for u in local.units} == {"records"}
    s3.use(monkeypatch)
    bucket = s3.create_bucket("images")
    for name in TREE:
        s3.put(f"{bucket}/in/{name}", (tmp_path / name).read_bytes())
    s3.put(f"{bucket}/tars/one.tar", b"")
    s3.put(f"{bucket}/tars/old/two.tar", b"")
    streamed = open_source(f"{bucket}/in/", stream_listing=True)
    assert [u.kind for u in streamed.units] == ["listing"]
    planned = open_source(f"{bucket}/in/")
    assert {u.kind for u in planned.units} == {"records"}
    keys = [r["key"] for r in iter_records(streamed)]
    assert keys == [r["key"] for r in iter_records(planned)]
    assert keys == list_files(f"{bucket}/in/", IMAGE_EXTENSIONS) and keys[0] == f"{bucket}/in/a-b.jpg"
    glob = f"{bucket}/in/*/*.jpg"
    assert [r["key"] for r in iter_records(open_source(glob, stream_listing=True))] == list_files(glob)
    assert open_source(f"{bucket}/tars", stream_listing=False).kind == "archive"
    with pytest.raises(FolderOfArchives):  # its kind was guessed without listing it
        list(iter_records(open_source(f"{bucket}/tars", stream_listing=True)))
    assert list(iter_records(open_source(f"{bucket}/tars", "folder", stream_listing=True))) == []
    with pytest.raises(FileNotFoundError):
        open_source(f"{bucket}/missing/", stream_listing=True)


def test_zip_links_and_repeated_names_are_error_rows(tmp_path):
    import stat
    import warnings

    path = str(tmp_path / "tricky.zip")
    png = encode(rgb_image(1), "PNG")
    with zipfile.ZipFile(path, "w") as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns about the duplicate name
        zf.writestr("one.png", png)
        link = zipfile.ZipInfo("link.png")
        link.create_system, link.external_attr = 3, (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
        zf.writestr("one.png", encode(rgb_image(2), "PNG"))
    records = list(iter_records(open_source(path)))
    assert [(r["key"], r["error_reason"]) for r in records] == [
        (f"{path}!one.png", ""), (f"{path}!link.png", "unsafe_archive_member"),
        (f"{path}!one.png#2", "duplicate_archive_member")]
    assert records[0]["bytes"] == png and "appears 2 times" in records[2]["error_detail"]


def test_tar_members_over_the_limit_are_rejected_unread(tmp_path):
    import io
    import tarfile

    from pipelines.sources.archive import iter_tar

    path = str(tmp_path / "mixed.tar")
    png = encode(rgb_image(3), "PNG")
    with tarfile.open(path, "w") as tar:
        for name, data in (("small.png", png), ("huge.png", b"\0" * (len(png) + 1)), ("small.png", png)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    records = list(iter_tar(path, max_member_bytes=len(png)))
    assert [(r["key"].split("!")[1], r["error_reason"]) for r in records] == [
        ("small.png", ""), ("huge.png", "too_large"), ("small.png#2", "duplicate_archive_member")]
    assert records[1]["error_detail"] == (f"{path}: member 'huge.png' is {len(png) + 1} bytes, over the limit of "
                                          f"{len(png)} bytes")


BOMB_READER = """
import re, sys
from pipelines.sources import iter_records, open_source
rows = [(r["key"], r["error_reason"]) for r in iter_records(open_source(sys.argv[1]))]
with open("/proc/self/status") as f:  # this process's peak (ru_maxrss would include the parent's, before exec)
    peak_kb = int(re.search(r"VmHWM:\\s+(\\d+) kB", f.read()).group(1))
print(rows, peak_kb // 1024)
"""


@pytest.mark.parametrize("suffix", ["tar.gz", "zip"])
def test_a_small_archive_of_a_huge_member_is_rejected_in_bounded_memory(tmp_path, suffix):
    """600 MB of zeros compress to under a megabyte: reading the archive must not hold the member."""
    import subprocess
    import sys
    import tarfile

    path, size = str(tmp_path / f"bomb.{suffix}"), 600 * 1024 * 1024

    zeros = tmp_path / "zeros.png"
    with open(zeros, "wb") as f:
        f.truncate(size)  # a sparse file: 600 MB of zeros that take no disk
    if suffix == "zip":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
            zf.write(zeros, "bomb.png")
    else:
        with tarfile.open(path, "w:gz", compresslevel=1) as tar:
            tar.add(zeros, "bomb.png")
    zeros.unlink()
    assert os.path.getsize(path) < 5 * 1024 * 1024
    done = subprocess.run([sys.executable, "-c", BOMB_READER, path], capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr[-2000:]
    rows, peak_mb = done.stdout.rsplit(" ", 1)
    assert rows == repr([(f"{path}!bomb.png", "too_large")])
    assert int(peak_mb) < 400, f"peak memory {peak_mb} MB while rejecting a {size >> 20} MB member"
