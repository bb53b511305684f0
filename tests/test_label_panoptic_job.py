"""`detr label --task panoptic` on the shared two-node Ray cluster: a folder of synthetic panoptic images and a
corrupt file, labelled with a tiny random-weight panoptic model, then the same command again.

Each row's segments must equal a direct call of the model and `PanopticPostProcess` on the image alone
(every query's mask computed: the job computes only the kept queries'), its PNG must hold the same segment
ids, and the re-run must add nothing.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.ops import clip_boxes_to_image

from detr import PanopticPostProcess, pad_images
from jobs.cli import main as detr_cli
from messy_data import corrupt_jpeg
from panoptic_model import panoptic_images, save_tiny_panoptic
from pipelines.inference.detector import Detector
from pipelines.inference.panoptic import is_thing_map
from pipelines.labelling.output import ERRORS, LABELS, LabelOutput
from pipelines.labelling.segments import segment_masks
from pipelines.training.transforms import TransformsConfig
from pipelines.validation.decode import decode_image
from pipelines.validation.panoptic import decode_panoptic_png

pytestmark = pytest.mark.ray


def direct_panoptic(checkpoint: str, path: Path, threshold: float) -> dict:
    """The reference: decode the file, the model on it alone (all masks), the panoptic merge, in one torch
    thread as the job's actors run (the same arithmetic, bit for bit)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        detector = Detector.from_checkpoint(checkpoint, score_threshold=0.5)
        image = decode_image(path.read_bytes(), str(path)).array
        tensor = detector.preprocess(image)
        with torch.inference_mode():
            outputs = detector.model(*pad_images([tensor]))
        merged = PanopticPostProcess(is_thing_map(detector), threshold)(outputs, [tensor.shape[-2:]], [image.shape[:2]])
        detections = detector.detect([image])[0]
        detections["boxes"] = clip_boxes_to_image(detections["boxes"], image.shape[:2])  # as labelled rows are
        return {**merged[0], "detections": detections}
    finally:
        torch.set_num_threads(threads)


def test_label_panoptic_rows_and_pngs_equal_direct_calls_and_rerun_adds_nothing(ray_cluster, tmp_path, capsys):
    checkpoint = save_tiny_panoptic(tmp_path / "pan.pt", TransformsConfig.small())
    images = panoptic_images(tmp_path / "shapes")
    folder = tmp_path / "shapes" / "images"
    (folder / "broken.jpg").write_bytes(corrupt_jpeg())
    inputs = sorted(str(p) for p in folder.iterdir())
    out, coco = tmp_path / "out", tmp_path / "panoptic.json"
    detection = ["label", "--model", checkpoint, "--input", str(folder), "--output", str(out),
                 "--score-threshold", "0.5", "--concurrency", "1", "--batch-size", "3", "--rows-per-file", "4"]
    argv = [*detection, "--task", "panoptic", "--coco-panoptic-json", str(coco)]
    assert detr_cli(argv) == 0
    printed = capsys.readouterr().out
    assert f"labelled {len(images)} images" in printed and "1 errors" in printed

    output = LabelOutput(str(out))
    rows = output.read(LABELS).to_pylist()
    errors = output.read(ERRORS).to_pylist()
    assert sorted([r["key"] for r in rows] + [e["image"] for e in errors]) == inputs  # each image once
    assert [e["image"] for e in errors] == [str(folder / "broken.jpg")]
    segments = 0
    for row in rows:
        want = direct_panoptic(checkpoint, Path(row["key"]), 0.85)
        got = [(s["id"], s["category_id"], s["isthing"]) for s in row["segments"]]
        assert got == [(s["id"], s["category_id"], s["isthing"]) for s in want["segments_info"]]
        np.testing.assert_allclose([s["score"] for s in row["segments"]], want["scores"].numpy(), atol=1e-5)
        # The job's forward pass (masks for the kept queries only) and the reference's (all of them) agree up to
        # float rounding; on some CPUs (seen with AVX-512) that moves the odd pixel where two masks tie.
        id_map = want["id_map"].numpy()
        png = decode_panoptic_png((out / row["panoptic_file"]).read_bytes())
        assert png.shape == (row["height"], row["width"]) == id_map.shape
        assert (png == id_map).mean() >= 0.999
        masks = segment_masks(row["segments"])
        for segment, mask, reference in zip(row["segments"], masks, want["segments_info"]):
            np.testing.assert_array_equal(mask, png == segment["id"])  # the row's RLE and its PNG agree exactly
            assert segment["area"] == int(mask.sum()) and abs(segment["area"] - reference["area"]) <= 2
        assert row["labels"] == want["detections"]["labels"].tolist()  # boxes from the same forward pass
        np.testing.assert_allclose(np.asarray(row["boxes"]).reshape(-1, 4), want["detections"]["boxes"], atol=1e-3)
        segments += len(row["segments"])
    assert segments >= 2 * len(rows)
    assert sorted(p.name for p in (out / "panoptic").iterdir()) == sorted(Path(r["panoptic_file"]).name for r in rows)

    manifest = LabelOutput(str(out)).read_manifest()
    assert manifest["settings"]["task"] == "panoptic" and manifest["settings"]["panoptic_threshold"] == 0.85
    assert manifest["runs"][0]["segments"] == segments
    exported = json.loads(coco.read_text())
    assert sum(len(a["segments_info"]) for a in exported["annotations"]) == segments

    # The same command again: nothing left to do, no row or PNG written again.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.suffix in (".parquet", ".png")}
    assert detr_cli(argv) == 0
    assert "labelled 0 images (0 detections, 0 segments), 0 errors" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.suffix in (".parquet", ".png")} == before
    # Another task into the same output is refused, with the reason.
    assert detr_cli(detection) == 1
    assert "task 'panoptic' (now 'detection')" in capsys.readouterr().err
