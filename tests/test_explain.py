"""`detr explain`: attention read through hooks changes nothing the model computes, points at the right
cells, and maps onto the right pixels; bad points and unreadable images are one line each."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import detr
from detr import pad_images
from detr.attention import AttentionRecorder
from detr.errors import RaydetrError
from pipelines.inference.detector import Detector, transforms_to_metadata
from pipelines.inference.explain import explain_image
from pipelines.training.transforms import TransformsConfig
from test_inference_model import CONFIGS, model_with_statistics


def picture(seed: int = 0, size: tuple[int, int] = (96, 128)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


@pytest.mark.parametrize("name", ["tiny", "tiny_panoptic", "fast_panoptic_stride8"])
def test_recording_attention_leaves_the_outputs_bit_identical(name):
    model = model_with_statistics(CONFIGS[name])
    generator = torch.Generator().manual_seed(0)
    images, mask = pad_images([torch.randn(3, 70, 90, generator=generator),
                               torch.randn(3, 96, 64, generator=generator)])
    with torch.no_grad():
        plain = model(images, mask)
        with AttentionRecorder(model) as recorder:
            recorded = model(images, mask)
    for key in ("pred_logits", "pred_boxes"):
        assert torch.equal(plain[key], recorded[key]), key
    maps = recorder.maps()
    h, w = maps.feature_size
    assert maps.decoder.shape == (2, plain["pred_logits"].shape[1], h * w) and maps.encoder.shape == (2, h * w, h * w)
    torch.testing.assert_close(maps.decoder.sum(-1), torch.ones(maps.decoder.shape[:2]))  # a distribution each
    # padding gets no attention: the second image is padded on the right
    stride = detr.detector_of(model).backbone.stride  # cell i covers input pixel stride * i
    padded_cells = mask[:, ::stride, ::stride]
    assert padded_cells[1].any() and maps.decoder[1][:, padded_cells[1].flatten()].max() < 1e-6


def forced_to_one_cell(model: torch.nn.Module, scale: float = 400.0) -> torch.Tensor:
    """Set the last decoder layer's cross-attention so that every query attends to the cell whose key x
    maximises v.x (query projection: the constant s*a; key projection: a (v.x)). Returns v."""
    attention = detr.detector_of(model).transformer.decoder.layers[-1].multihead_attn
    e = attention.embed_dim
    generator = torch.Generator().manual_seed(1)
    a, v = torch.randn(e, generator=generator), torch.randn(e, generator=generator)
    a, v = a / a.norm(), v / v.norm()
    with torch.no_grad():
        attention.in_proj_weight[:e].zero_()
        attention.in_proj_bias[:e] = scale * a * e ** 0.5
        attention.in_proj_weight[e:2 * e] = torch.outer(a, v)
        attention.in_proj_bias[e:2 * e] = 0
    return v


def test_forced_decoder_attention_lights_exactly_that_cell_and_its_pixels():
    model = model_with_statistics(CONFIGS["tiny"])
    v = forced_to_one_cell(model)
    keys = {}
    attention = detr.detector_of(model).transformer.decoder.layers[-1].multihead_attn
    handle = attention.register_forward_hook(lambda m, args, kwargs, out: keys.update(key=kwargs["key"]),
                                             with_kwargs=True)
    detector = Detector(model, TransformsConfig.small(), score_threshold=0.0, optimize=False)
    image = picture(size=(100, 150))
    explanation = explain_image(detector, image, top_k=3)
    handle.remove()
    h, w = explanation.feature_size
    cell = int((keys["key"][0] @ v).argmax())  # the cell the weights point every query at
    row, column = divmod(cell, w)
    with AttentionRecorder(model) as recorder, torch.no_grad():
        batch, mask = pad_images([detector.preprocess(image)])
        model(batch, mask)
    maps = recorder.maps()
    assert maps.decoder[0, :, cell].min() > 0.99
    # On the image: the map is 1 over that cell's pixels, and near 0 away from them.
    resized = detector.preprocessing.resize(image).shape[-2:]
    stride = detr.detector_of(model).backbone.stride
    y_scale, x_scale = image.shape[0] / resized[0], image.shape[1] / resized[1]
    top, left = int(row * stride * y_scale), int(column * stride * x_scale)
    bottom = int(min((row + 1) * stride, resized[0]) * y_scale)
    right = int(min((column + 1) * stride, resized[1]) * x_scale)
    lit = explanation.decoder_maps[0]
    centre = lit[(top + bottom) // 2, (left + right) // 2]
    assert centre > 0.95
    outside = np.ones_like(lit, dtype=bool)
    outside[max(0, top - stride):bottom + stride, max(0, left - stride):right + stride] = False
    assert lit[outside].max() < 0.05 if outside.any() else True


def test_an_explanation_has_a_map_per_detection_and_point_and_refuses_points_outside():
    model = model_with_statistics(CONFIGS["fast_panoptic_stride8"])  # two-stage queries: the decoder still attends
    detector = Detector(model, TransformsConfig.small(), score_threshold=0.0, optimize=False)
    image = picture(2, (90, 120))
    explanation = explain_image(detector, image, top_k=4)
    assert len(explanation.scores) == 4 and explanation.decoder_maps.shape == (4, 90, 120)
    assert np.allclose(explanation.decoder_maps.reshape(4, -1).max(1), 1.0)
    assert (np.diff(explanation.scores) <= 0).all()
    centres = [((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in explanation.boxes]
    for (x, y), (cx, cy) in zip(explanation.points, centres):
        assert (x, y) == (min(max(cx, 0), 119), min(max(cy, 0), 89))
    at = explain_image(detector, image, points=[(5, 5), (110, 80)], top_k=1)
    assert at.encoder_maps.shape == (2, 90, 120) and at.points == [(5, 5), (110, 80)]
    with pytest.raises(RaydetrError, match=r"the image is 120x90 \(width x height\): point 130,5 lies outside it"):
        explain_image(detector, image, points=[(130, 5)])


def test_detr_explain_writes_pngs_and_skips_what_it_cannot_read(tmp_path, capsys):
    from jobs.cli import main as detr_cli

    model = model_with_statistics(CONFIGS["tiny"])
    checkpoint = detr.save_checkpoint(model, tmp_path / "m.pt", {
        "transforms": transforms_to_metadata(TransformsConfig.small()),
        "categories": [{"id": i, "name": f"class{i}"} for i in range(1, 3)]})
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(picture(i, (80 + 10 * i, 100))).save(folder / f"img{i}.png")
    (folder / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "out"
    assert detr_cli(["explain", "--model", str(checkpoint), "--input", str(folder), "--output", str(out),
                     "--top-k", "3", "--score-threshold", "0"]) == 0
    printed, errors = capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == ["img0_decoder.png", "img0_encoder.png", "img1_decoder.png",
                                                     "img1_encoder.png"]
    assert Image.open(out / "img1_decoder.png").size == (500, 450)  # enlarged 5x: a shorter side of at least 384
    assert "img0.png: 3 detections" in printed and "skipped" in errors and "broken.jpg" in errors
    assert detr_cli(["explain", "--model", str(checkpoint), "--input", str(folder), "--output", str(out),
                     "--points", "5,500"]) == 1
    errors = capsys.readouterr().err
    assert "point 5,500 lies outside it" in errors and "no image there could be explained" in errors
