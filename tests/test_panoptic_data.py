"""COCO panoptic data: the synthetic panoptic set, reading and validating PNG + JSON, masks through augmentation."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from jobs.cli import main as detr
from jobs.synthetic_data import SyntheticConfig, render_image
from pipelines.sources import iter_records, open_source
from pipelines.training.collate import collate_samples
from pipelines.training.samples import make_sample
from pipelines.training.transforms import (RandomSizeCrop, TransformsConfig, _target_tensors, apply_transform,
                                           build_transform)
from pipelines.validation import errors as E
from pipelines.validation.loading import load_record
from pipelines.validation.panoptic import decode_panoptic_png, encode_panoptic_png, id2rgb, rgb2id


@pytest.fixture(scope="module")
def panoptic_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("panoptic")
    assert detr(["make-dataset", str(out), "--images", "12", "--panoptic", "--val-fraction", "0.25", "--seed", "5",
                 "--max-overlap", "0.2"]) == 0
    return out


def test_make_dataset_panoptic_writes_coco_panoptic(panoptic_set, tmp_path):
    data = json.loads((panoptic_set / "panoptic_train.json").read_text())
    categories = {c["id"]: c for c in data["categories"]}
    assert [c["isthing"] for c in data["categories"]] == [1, 1, 1, 1, 0, 0, 0, 0]
    assert len(data["images"]) == 9 and len(data["annotations"]) == 9
    stuff_seen = set()
    for ann in data["annotations"]:
        ids = rgb2id(np.asarray(Image.open(panoptic_set / "panoptic_train" / ann["file_name"])))
        info = {s["id"]: s for s in ann["segments_info"]}
        assert set(np.unique(ids).tolist()) == set(info)  # every pixel belongs to a listed segment
        for sid, s in info.items():
            ys, xs = np.nonzero(ids == sid)
            assert s["area"] == len(xs)
            assert s["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            if not categories[s["category_id"]]["isthing"]:
                stuff_seen.add(s["category_id"])
    assert len(stuff_seen) >= 3
    # Seeded: the same options give the same files.
    assert detr(["make-dataset", str(tmp_path / "again"), "--images", "12", "--panoptic", "--val-fraction", "0.25",
                 "--seed", "5", "--max-overlap", "0.2"]) == 0
    for name in sorted(os.listdir(panoptic_set / "panoptic_train")):
        assert (panoptic_set / "panoptic_train" / name).read_bytes() == (tmp_path / "again" / "panoptic_train" / name
                                                                          ).read_bytes()


def test_panoptic_png_round_trip():
    ids = np.array([[0, 1, 255], [256, 65536 + 7, 70000]])
    assert np.array_equal(rgb2id(id2rgb(ids)), ids)
    assert np.array_equal(decode_panoptic_png(encode_panoptic_png(torch.as_tensor(ids))), ids)


def test_source_reads_segments_as_annotations_with_masks(panoptic_set):
    source = open_source(str(panoptic_set / "panoptic_train.json"))
    assert source.is_panoptic and source.kind == "coco_panoptic"
    record = next(iter_records(source))
    loaded, errors = load_record(record, source.category_ids)
    assert errors == []
    ann = loaded.annotations
    assert ann.masks.shape == (len(ann.boxes), loaded.image.height, loaded.image.width)
    for box, mask, area in zip(ann.boxes, ann.masks, ann.area):
        ys, xs = np.nonzero(mask)
        assert area == mask.sum() and list(box) == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    sample, _, _ = make_sample(record, build_transform(TransformsConfig.small(), False), seed=0, epoch=0,
                               known_categories=source.category_ids)
    _, _, targets = collate_samples([sample])
    assert targets[0]["masks"].dtype == torch.bool
    assert targets[0]["masks"].shape == (len(sample["labels"]), *sample["size"])


def drawn_shape_sample(transform, seed):
    config = SyntheticConfig(images=1, classes=4, min_objects=3, max_objects=3, panoptic=True, seed=seed,
                             min_image_size=96, max_image_size=128)
    rendered = render_image(config, 0)
    objects = rendered.objects
    masks = np.stack([rendered.instance_map == o["instance"] for o in objects])
    boxes = np.array([o["bbox"] for o in objects], dtype=np.float64)
    labels = np.array([o["category_id"] for o in objects])
    colours = [rendered.image[m][0] for m in masks]  # a shape is drawn in one colour
    out = apply_transform(transform, rendered.image, boxes, labels, masks.sum((1, 2)).astype(float), seed=seed,
                          masks=masks)
    return out, colours, labels


def check_box_on_mask(box, mask, size, tol):
    """The mask lies in its box; a mask the crop did not cut spans its box exactly (up to `tol` pixels)."""
    h, w = size
    ys, xs = np.nonzero(mask)
    cx, cy, bw, bh = box * [w, h, w, h]
    corners = np.array([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2])
    extent = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    assert (extent[:2] >= corners[:2] - tol).all() and (extent[2:] <= corners[2:] + tol).all()
    if extent[0] > 0 and extent[1] > 0 and extent[2] < w and extent[3] < h:
        assert np.allclose(corners, extent, atol=tol)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_flip_and_crop_move_masks_boxes_and_pixels_together(seed):
    transform = v2.Compose([v2.RandomHorizontalFlip(p=1.0), RandomSizeCrop(60, 90),
                            v2.SanitizeBoundingBoxes(min_size=1, labels_getter=_target_tensors)])
    out, colours, labels = drawn_shape_sample(transform, seed)
    h, w = out["size"]
    image = out["image"].permute(1, 2, 0).numpy()
    assert out["masks"].shape == (len(out["labels"]), h, w)
    for box, mask, label in zip(out["boxes"].numpy(), out["masks"].numpy(), out["labels"].tolist()):
        check_box_on_mask(box, mask, (h, w), 1e-4)
        pixels = image[mask]
        assert (pixels == pixels[0]).all()  # the mask covers exactly one drawn shape's pixels...
        assert any((pixels[0] == c).all() for c, lb in zip(colours, labels) if lb == label)  # ...of its class
        # ...and the shape has no pixel outside its mask (colours are drawn at random: compare the 3 channels).
        assert ((image == pixels[0]).all(-1) & ~mask).sum() <= 0.01 * mask.sum() + 2


def test_resizing_keeps_masks_on_their_boxes():
    config = TransformsConfig.small()
    resize = v2.Compose([v2.RandomShortestSize(min_size=list(config.train_scales), max_size=config.max_size),
                         v2.SanitizeBoundingBoxes(min_size=1, labels_getter=_target_tensors)])
    for seed in range(4):
        for transform in (resize, build_transform(config, True)):
            out, _, _ = drawn_shape_sample(transform, seed)
            assert out["masks"].shape[-2:] == tuple(out["size"])
        # torchvision resizes masks by nearest neighbour with floor rounding (as the official code does),
        # which moves a mask edge by up to about one output pixel against the exactly scaled box.
        out, _, _ = drawn_shape_sample(resize, seed)
        for box, mask in zip(out["boxes"].numpy(), out["masks"].numpy()):
            check_box_on_mask(box, mask, out["size"], 2.0)


def test_bad_panoptic_annotations_land_in_the_errors_table(panoptic_set, tmp_path):
    root = tmp_path / "bad"
    shutil.copytree(panoptic_set, root)
    data = json.loads((root / "panoptic_train.json").read_text())
    anns = data["annotations"]
    png_dir = root / "panoptic_train"
    # 0: PNG of the wrong size; 1: a listed segment missing from the PNG; 2: a segment missing from the JSON;
    # 3: an unknown category; 4: no PNG at all; 5: not a PNG.
    Image.open(png_dir / anns[0]["file_name"]).resize((20, 20)).save(png_dir / anns[0]["file_name"])
    anns[1]["segments_info"].append({"id": 99, "category_id": 1, "iscrowd": 0, "bbox": [0, 0, 5, 5], "area": 25})
    anns[2]["segments_info"].pop(0)
    anns[3]["segments_info"][0]["category_id"] = 42
    os.remove(png_dir / anns[4]["file_name"])
    (png_dir / anns[5]["file_name"]).write_bytes(b"not a png")
    (root / "panoptic_train.json").write_text(json.dumps(data))
    source = open_source(str(root / "panoptic_train.json"))
    reasons, kept = {}, {}
    for record in iter_records(source):
        sample, loaded, errors = make_sample(record, build_transform(TransformsConfig.small(), False), seed=0, epoch=0,
                                             known_categories=source.category_ids, with_masks=True)
        reasons[record["image_id"]] = sorted(e.reason for e in errors)
        kept[record["image_id"]] = sample
    ids = [a["image_id"] for a in anns]
    assert reasons[ids[0]] == [E.PANOPTIC_SIZE_MISMATCH] and kept[ids[0]] is None
    assert reasons[ids[1]] == [E.SEGMENT_MISSING_FROM_PNG] and kept[ids[1]] is not None
    assert reasons[ids[2]] == [E.SEGMENT_MISSING_FROM_JSON]
    assert len(kept[ids[2]]["labels"]) == len(anns[2]["segments_info"])  # the unlisted segment is unlabelled
    assert reasons[ids[3]] == [E.UNKNOWN_CATEGORY]
    assert reasons[ids[4]] == [E.PANOPTIC_PNG_ERROR] and kept[ids[4]] is None
    assert reasons[ids[5]] == [E.PANOPTIC_PNG_ERROR] and kept[ids[5]] is None
    assert all(reasons[i] == [] for i in ids[6:])
    table = E.errors_to_table([e for r in iter_records(source) for e in load_record(r, source.category_ids)[1]])
    assert set(table.column("reason").to_pylist()) == {E.PANOPTIC_SIZE_MISMATCH, E.SEGMENT_MISSING_FROM_PNG,
                                                       E.SEGMENT_MISSING_FROM_JSON, E.UNKNOWN_CATEGORY,
                                                       E.PANOPTIC_PNG_ERROR}
