"""End to end on the shared two-node Ray cluster: ingest, training/eval datasets, archives."""
from __future__ import annotations

import hashlib
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from jobs.cli import main as detr
from jobs.synthetic_data import SyntheticConfig, write_dataset
from messy_data import add_hostile_entries, write_messy_coco, write_unsafe_tar
from pipelines.sources import open_source
from pipelines.sources.reader import read_source
from pipelines.training.dataset import build_detection_dataset
from pipelines.training.transforms import TransformsConfig
from pipelines.validation.errors import read_errors_table
from pipelines.validation.loading import decode_batch

pytestmark = pytest.mark.ray


def files_digest(folder):
    return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(folder))}


def test_ingest_messy_coco_then_train_from_the_shards(ray_cluster, tmp_path, capsys):
    path, expected = write_messy_coco(str(tmp_path / "src"))
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"private")
    planning = add_hostile_entries(path, str(secret))  # five unusable image entries, three bad annotations
    out = str(tmp_path / "ingested")
    argv = ["ingest", path, out, "--images", str(tmp_path / "src" / "img"), "--rows-per-shard", "4"]
    assert detr(argv) == 0
    printed = capsys.readouterr().out
    assert "read 16 images: kept 6 (5 repaired), rejected 10" in printed
    shards = pq.read_table(os.path.join(out, "data")).to_pylist()
    assert sorted(r["key"] for r in shards) == sorted(k for k, v in expected.items() if v == "kept")
    errors = read_errors_table(os.path.join(out, "errors"))
    by_image = {}
    for e in errors:
        by_image.setdefault(e["image"], []).append(e["reason"])
    for name, want in {**expected, **planning}.items():
        if want not in ("kept", "malformed_annotation"):
            assert by_image[name] == [want]
    assert sorted(by_image["good.jpg"]) == ["box_out_of_image", "degenerate_box", *["malformed_annotation"] * 3,
                                            "unknown_category"]
    rotated = next(r for r in shards if r["key"] == "rotated.jpg")
    assert (rotated["width"], rotated["height"]) == (48, 64)
    np.testing.assert_allclose(rotated["boxes"], [[28, 8, 10, 16]], atol=1e-3)
    assert pq.read_schema(os.path.join(out, "data", "coco-00000-00000.parquet")).metadata[b"raydetr.categories"]

    # An ingest that keeps nothing fails, saying why (here: the images are not where the file names point).
    assert detr(["ingest", path, str(tmp_path / "nothing")]) == 1
    assert ("no image was kept (duplicate_image_id 1, malformed_annotation 3, malformed_image_entry 2, read_error 11, "
            "unsafe_path 2)") in capsys.readouterr().err

    # Idempotent and deterministic: a second run skips every unit and changes no byte.
    before = files_digest(os.path.join(out, "data"))
    assert detr(argv) == 0
    assert "(1 units already done)" in capsys.readouterr().out
    assert files_digest(os.path.join(out, "data")) == before

    # The shards are a source: the training dataset reads them back with the category table.
    ds = build_detection_dataset(out, train=True, transforms=TransformsConfig.small(), seed=0)
    assert [c["id"] for c in ds.categories] == [1, 2]
    targets = [t for _, _, batch in ds.iter_batches(batch_size=3) for t in batch]
    assert len(targets) == 6 and ds.errors.summary().images_kept == 6
    rot = next(t for t in targets if t["image_id"].item() == 9)
    assert rot["orig_size"].tolist() == [64, 48] and rot["labels"].tolist() == [2]


def test_training_dataset_contract_errors_and_reproducibility(ray_cluster, tmp_path):
    paths = write_dataset(str(tmp_path), SyntheticConfig(images=24, min_objects=0, max_objects=3, seed=5))
    (tmp_path / "images" / "000003.png").write_bytes(b"")  # one broken image among them
    config = TransformsConfig.small()
    data = build_detection_dataset(paths["train"], train=True, transforms=config, seed=11, epoch=0)
    epochs = []
    for epoch in range(2):
        data.set_epoch(epoch)  # as the training loop does before each epoch
        seen = {}
        for images, mask, targets in data.iter_batches(batch_size=5):
            assert images.dtype == torch.float32 and images.shape[0] == mask.shape[0] == len(targets)
            assert mask.dtype == torch.bool and images.shape[-2:] == mask.shape[-2:]
            for img, m, t in zip(images, mask, targets):
                h, w = t["size"].tolist()
                assert not m[:h, :w].any() and m.sum() == m.numel() - h * w and (img[:, m] == 0).all()
                assert any(abs(min(h, w) - s) <= 1 for s in config.train_scales) or max(h, w) == config.max_size  # int() rounding
                assert t["boxes"].shape == (len(t["labels"]), 4) and torch.isfinite(t["boxes"]).all()
                seen[t["image_id"].item()] = (t["size"].tolist(), t["boxes"].clone())
        epochs.append(seen)
    assert len(epochs[0]) == 23 and 4 not in epochs[0]  # image id 4 is the broken file
    assert [(e.image, e.reason) for e in data.errors.errors()] == [("images/000003.png", "zero_byte")]
    assert data.errors.summary().format().startswith("read 24 images: kept 23")
    # Epochs differ; a dataset built anew (a resumed run) reproduces the second epoch exactly.
    assert any(epochs[0][i][0] != epochs[1][i][0] for i in epochs[0])
    again = build_detection_dataset(paths["train"], train=True, transforms=config, seed=11, epoch=1,
                                    collect_errors=False, group_aspect_ratio_window=10)
    replay = {t["image_id"].item(): (t["size"].tolist(), t["boxes"]) for _, _, b in again.iter_batches(batch_size=5) for t in b}
    assert replay.keys() == epochs[1].keys()
    for i, (size, boxes) in replay.items():
        assert size == epochs[1][i][0] and torch.allclose(boxes, epochs[1][i][1])
    evaluation = build_detection_dataset(paths["train"], train=False, transforms=config, collect_errors=False)
    sizes = [t["size"].tolist() for _, _, b in evaluation.iter_batches(batch_size=8) for t in b]
    assert len(sizes) == 23 and all(min(s) == config.eval_size or max(s) == config.eval_max_size for s in sizes)


def test_archive_stream_for_labelling_adds_up(ray_cluster, tmp_path):
    tar = str(tmp_path / "batch.tar.gz")
    good = write_unsafe_tar(tar)
    ds = read_source(open_source(tar)).map_batches(decode_batch, batch_format="numpy")
    rows = ds.take_all()
    ok = sorted(r["key"] for r in rows if not r["error_reason"])
    bad = sorted(r["key"] for r in rows if r["error_reason"])
    assert ok == [f"{tar}!{m}" for m in good]
    assert bad == [f"{tar}!{m}" for m in ("../escape.jpg", "/abs/evil.png", "link.jpg")]
    assert all(r["image"].shape == (48, 64, 3) for r in rows if not r["error_reason"])
