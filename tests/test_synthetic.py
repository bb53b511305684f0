"""The synthetic shapes dataset: seeded, exact boxes, splits, and the make-dataset command."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

from jobs.cli import main as detr
from jobs.synthetic_data import SHAPES, SyntheticConfig, render_image, write_dataset


def digest(folder):
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        h.update(name.encode() + open(os.path.join(folder, name), "rb").read())
    return h.hexdigest()


def test_command_is_deterministic_and_splits(tmp_path, capsys):
    args = ["--images", "30", "--classes", "5", "--val-fraction", "0.2", "--seed", "3", "--max-overlap", "0.3"]
    assert detr(["make-dataset", str(tmp_path / "a"), *args]) == 0
    assert detr(["make-dataset", str(tmp_path / "b"), *args, "--workers", "2"]) == 0
    assert "wrote 30 images" in capsys.readouterr().out
    assert digest(tmp_path / "a" / "images") == digest(tmp_path / "b" / "images")
    train = json.loads((tmp_path / "a" / "train.json").read_text())
    val = json.loads((tmp_path / "a" / "val.json").read_text())
    assert len(train["images"]) == 24 and len(val["images"]) == 6
    assert not {i["id"] for i in train["images"]} & {i["id"] for i in val["images"]}
    assert [c["id"] for c in train["categories"]] == [1, 2, 3, 4, 5]
    assert {a["category_id"] for a in train["annotations"]} <= {1, 2, 3, 4, 5}
    assert detr(["make-dataset", str(tmp_path / "c"), *args[:-4], "--seed", "4"]) == 0
    assert digest(tmp_path / "a" / "images") != digest(tmp_path / "c" / "images")


def test_boxes_are_the_exact_drawn_extent(tmp_path):
    config = SyntheticConfig(images=12, classes=8, min_objects=2, max_objects=6, max_overlap=0.4)
    paths = write_dataset(str(tmp_path), config)
    coco = json.loads(open(paths["train"]).read())
    for image in coco["images"]:
        pixels = np.asarray(Image.open(tmp_path / image["file_name"]))
        rendered = render_image(config, image["id"] - 1)
        np.testing.assert_array_equal(pixels, rendered.image)  # PNG is lossless
        anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        assert len(anns) == len(rendered.objects) >= 1
        for ann, obj in zip(anns, rendered.objects):
            ys, xs = np.nonzero(rendered.instance_map == obj["instance"])
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert ann["area"] == len(xs) and 1 <= ann["category_id"] <= 8


def test_overlap_limit_and_options():
    config = SyntheticConfig(images=1, min_objects=6, max_objects=6, max_overlap=0.0, min_object_size=10,
                             max_object_size=20)
    for i in range(20):
        objs = render_image(config, i).objects
        for a in objs:
            for b in objs:
                if a is not b:
                    ax, ay, aw, ah = a["bbox"]
                    bx, by, bw, bh = b["bbox"]
                    assert ax + aw <= bx or bx + bw <= ax or ay + ah <= by or by + bh <= ay
    with pytest.raises(ValueError, match="classes"):
        SyntheticConfig(classes=len(SHAPES) + 1)
    with pytest.raises(ValueError, match="max_object_size"):
        SyntheticConfig(max_object_size=200)
