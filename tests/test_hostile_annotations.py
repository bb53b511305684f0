"""Annotation files and folders as a careless or hostile user writes them: every bad entry is a row of the
errors table naming the file and the entry, and the rest of the dataset is read."""
from __future__ import annotations

import json
import os

import pytest

from messy_data import add_hostile_entries, encode, rgb_image, write_messy_coco
from pipelines.sources import iter_records, open_source
from pipelines.sources.coco import load_coco_json


@pytest.fixture
def hostile(tmp_path):
    path, expected = write_messy_coco(str(tmp_path / "data"))
    (tmp_path / "outside").mkdir()
    secret = tmp_path / "outside" / "secret.jpg"
    secret.write_bytes(encode(rgb_image(9), "JPEG"))
    planning = add_hostile_entries(path, str(secret))
    return path, expected, planning, str(tmp_path / "data" / "img")


def test_bad_entries_are_error_rows_and_the_rest_is_planned(hostile):
    path, expected, planning, images = hostile
    source = open_source(path, images=images)
    errors = {}
    for e in source.planning_errors:
        errors.setdefault(e.image, []).append(e)
    assert {image: [e.reason for e in found] for image, found in errors.items()} == {
        image: [reason] * (3 if reason == "malformed_annotation" else 1) for image, reason in planning.items()}
    details = [e.detail for e in errors["good.jpg"]]
    assert details[0] == f"{path}: annotation 900 of good.jpg: bbox [1, 2, 3] is not 4 finite numbers"
    assert "annotation 901" in details[1] and "category_id 'red' is not an integer" in details[2]
    assert "which good.jpg has already" in errors["dup.jpg"][0].detail
    assert "--allow-outside-paths" in errors["../outside/secret.jpg"][0].detail
    records = {r["key"]: r for r in iter_records(source)}
    assert set(records) == set(expected)  # every usable image, and only those
    assert len(records["good.jpg"]["boxes"]) == 6  # its six well-formed annotations: the malformed ones dropped


def test_outside_paths_are_read_when_allowed(hostile):
    path, _, _, images = hostile
    source = open_source(path, images=images, allow_outside_paths=True)
    keys = {r["key"] for r in iter_records(source)}
    assert {"../outside/secret.jpg", os.path.join(os.path.dirname(images), "..", "outside", "secret.jpg")} & keys
    assert not any(e.reason == "unsafe_path" for e in source.planning_errors)


def test_a_link_out_of_a_folder_is_refused(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "mine.png").write_bytes(encode(rgb_image(1), "PNG"))
    (tmp_path / "private.png").write_bytes(encode(rgb_image(2), "PNG"))
    (folder / "link.png").symlink_to(tmp_path / "private.png")
    (folder / "inside.png").symlink_to(folder / "mine.png")  # a link that stays inside is fine
    records = {os.path.basename(r["key"]): r for r in iter_records(open_source(str(folder)))}
    assert {name: r["error_reason"] for name, r in records.items()} == {
        "inside.png": "", "link.png": "unsafe_path", "mine.png": ""}
    assert "is a link to" in records["link.png"]["error_detail"] and records["link.png"]["path"] == ""
    allowed = {os.path.basename(r["key"]): r["error_reason"]
               for r in iter_records(open_source(str(folder), allow_outside_paths=True))}
    assert allowed == {"inside.png": "", "link.png": "", "mine.png": ""}


@pytest.mark.parametrize("field, value, message", [
    ("annotations", {"a": 1}, "'annotations' is not a list"),
    ("categories", [{"name": "x"}], "categories[0] has no integer 'id'"),
])
def test_a_file_that_is_unusable_as_a_whole_names_the_file_and_the_field(tmp_path, field, value, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"images": [], field: value}))
    with pytest.raises(ValueError) as info:
        load_coco_json(str(path))
    assert str(info.value) == f"{path}: {message}" + ("" if field == "annotations" else f" ({value[0]!r})")
