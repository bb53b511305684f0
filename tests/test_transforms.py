"""The paper's augmentation: boxes move exactly as pixels do; crops drop what leaves them."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.ops import box_convert
from torchvision.transforms import v2

from pipelines.training.collate import collate_samples
from pipelines.training.transforms import (RandomSizeCrop, TransformsConfig, apply_transform, build_eval_transform,
                                           build_train_transform, image_seed)


def drawn(h=90, w=120, rects=((10, 20, 30, 16), (70, 50, 40, 30))):
    """An image with solid rectangles (x, y, w, h), each a different colour, on black."""
    img = np.zeros((h, w, 3), np.uint8)
    for i, (x, y, bw, bh) in enumerate(rects):
        img[y:y + bh, x:x + bw] = (255, 40 * (i + 1), 0)
    return img, np.array(rects, np.float64)


def pixel_box(image: torch.Tensor, green: int) -> list[float]:
    """Box (x0, y0, x1, y1) in pixels of the rectangle of a given green level in a [3,H,W] image."""
    mask = (image[0] > 128) & ((image[1].int() - green).abs() <= 2)
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def to_pixels(out) -> np.ndarray:
    h, w = out["size"]
    xyxy = box_convert(out["boxes"], "cxcywh", "xyxy") * torch.tensor([w, h, w, h])
    return xyxy.numpy()


def test_flip_moves_boxes_exactly_with_the_pixels():
    img, boxes = drawn()
    flip = v2.Compose([v2.RandomHorizontalFlip(p=1.0)])
    out = apply_transform(flip, img, boxes, np.array([1, 2]), boxes[:, 2] * boxes[:, 3], seed=0)
    for i, box in enumerate(to_pixels(out)):
        assert pixel_box(out["image"], 40 * (i + 1)) == pytest.approx(box.tolist(), abs=1e-4)
    assert to_pixels(out)[0].tolist() == pytest.approx([120 - 40, 20, 120 - 10, 36])


def test_crop_moves_boxes_with_the_pixels_and_drops_boxes_that_leave():
    img, boxes = drawn()
    crop = v2.Compose([RandomSizeCrop(50, 60), v2.SanitizeBoundingBoxes(labels_getter=lambda x: (x[1]["labels"], x[1]["area"], x[1]["index"]))])
    seen_dropped = seen_kept = 0
    for seed in range(40):
        out = apply_transform(crop, img, boxes, np.array([1, 2]), np.array([480.0, 1200.0]), seed=seed)
        assert 50 <= out["size"][0] <= 60 and 50 <= out["size"][1] <= 60
        for label, box in zip(out["labels"].tolist(), to_pixels(out)):
            visible = pixel_box(out["image"], 40 * label)
            assert visible == pytest.approx(box.tolist(), abs=1e-4)  # the box is exactly the visible part
        for label in {1, 2} - set(out["labels"].tolist()):
            green = out["image"][1].int()
            assert not (((green - 40 * label).abs() <= 2) & (out["image"][0] > 128)).any()  # really gone
            seen_dropped += 1
        seen_kept += len(out["labels"])
    assert seen_dropped > 0 and seen_kept > 0


@pytest.mark.parametrize("config", [TransformsConfig.small(), TransformsConfig.small().scaled(1.5)])
def test_training_transform_sizes_finite_and_reproducible(config):
    img, boxes = drawn()
    transform = build_train_transform(config)
    shorter_sides = set()
    for seed in range(60):
        out = apply_transform(transform, img, boxes, np.array([1, 2]), boxes[:, 2] * boxes[:, 3], seed=seed)
        h, w = out["size"]
        assert h > 0 and w > 0 and max(h, w) <= config.max_size
        shorter_sides.add(min(h, w))
        assert out["image"].shape == (3, h, w) and out["image"].dtype == torch.uint8
        assert torch.isfinite(out["boxes"]).all() and ((out["boxes"] >= 0) & (out["boxes"] <= 1)).all()
        assert out["boxes"].shape == (len(out["labels"]), 4) and (out["boxes"][:, 2:] > 0).all()
        assert torch.isfinite(out["area"]).all()
        again = apply_transform(transform, img, boxes, np.array([1, 2]), boxes[:, 2] * boxes[:, 3], seed=seed)
        assert torch.equal(again["image"], out["image"]) and torch.equal(again["boxes"], out["boxes"])
    assert shorter_sides <= set(config.train_scales) | {s for s in range(1, config.max_size)}
    assert len(shorter_sides & set(config.train_scales)) >= 3  # multi-scale really varies


def test_paper_defaults_and_eval_resize():
    paper = TransformsConfig()
    assert paper.train_scales == (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
    assert (paper.max_size, paper.crop_resize_scales, paper.crop_min_size, paper.crop_max_size) == (1333, (400, 500, 600), 384, 600)
    assert (paper.eval_size, paper.eval_max_size) == (800, 1333)
    small = TransformsConfig.small()
    assert min(small.train_scales) >= 64 and max(small.train_scales) == 128 and small.eval_size == 128
    img, boxes = drawn()
    out = apply_transform(build_eval_transform(small), img, boxes, np.array([1, 2]), np.array([1.0, 1.0]))
    assert out["size"] == (128, 170)  # int(128 * 120 / 90), as the official code truncates
    np.testing.assert_allclose(out["boxes"][0].numpy(), [25 / 120, 28 / 90, 30 / 120, 16 / 90], atol=1e-6)


def test_an_image_without_boxes_stays_valid():
    img, _ = drawn(rects=())
    out = apply_transform(build_train_transform(TransformsConfig.small()), img, np.zeros((0, 4)),
                          np.zeros(0, np.int64), np.zeros(0), seed=3)
    assert out["boxes"].shape == (0, 4) and out["labels"].shape == (0,) and out["image"].numel() > 0


def test_image_seed_depends_on_seed_epoch_and_image():
    seeds = {image_seed(s, e, i) for s in (0, 1) for e in (0, 1) for i in (1, 2**40 + 1)}
    assert len(seeds) == 8 and image_seed(0, 0, 1) == image_seed(0, 0, 1)


def test_collate_contract():
    samples = []
    for i, (h, w) in enumerate([(40, 60), (50, 30)]):
        samples.append({
            "image": np.full((3, h, w), 255, np.uint8), "boxes": np.array([[0.5, 0.5, 0.2, 0.2]] * i, np.float32),
            "labels": np.array([3] * i, np.int64), "image_id": i + 7, "orig_size": np.array([h * 2, w * 2]),
            "size": np.array([h, w]), "area": np.array([4.0] * i, np.float32), "iscrowd": np.zeros(i, np.int64),
        })
    images, mask, targets = collate_samples(samples)
    assert images.shape == (2, 3, 50, 60) and images.dtype == torch.float32
    assert mask.shape == (2, 50, 60) and mask.dtype == torch.bool
    assert not mask[0, :40, :60].any() and mask[0, 40:, :].all() and mask[1, :, 30:].all()
    np.testing.assert_allclose(images[0, :, 0, 0].numpy(), [(1 - m) / s for m, s in
                                                            zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))], rtol=1e-5)
    assert (images[0, :, 40:, :] == 0).all()
    assert targets[0]["boxes"].shape == (0, 4) and targets[1]["labels"].dtype == torch.int64
    assert targets[1]["image_id"].item() == 8 and targets[1]["image_id"].dim() == 0
    assert targets[1]["orig_size"].tolist() == [100, 60] and targets[1]["size"].tolist() == [50, 30]
