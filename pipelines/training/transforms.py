"""The paper's training and evaluation transforms, built from torchvision.transforms.v2.

Boxes travel as `tv_tensors.BoundingBoxes` next to the image through every
geometric step, so flips, resizes and crops move them with torchvision's own
kernels (no box arithmetic here); panoptic samples' masks travel beside them as
`tv_tensors.Mask` through the same transforms (nearest-neighbour resizing), and
`SanitizeBoundingBoxes` drops a mask together with its box. `TransformsConfig` is the single source of the
recipe's numbers; `TransformsConfig.small()` scales the whole recipe down for
tests and CPU demos. Randomness is drawn from torch's generator, seeded per image
from (seed, epoch, image id), so an epoch is reproducible whichever worker runs it.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.ops import box_convert
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from detr.errors import RaydetrError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TransformsConfig:
    """DETR's augmentation recipe (section A.4 of the paper); defaults are the paper's numbers."""

    train_scales: tuple[int, ...] = tuple(range(480, 801, 32))  # shorter side, drawn uniformly
    max_size: int = 1333  # longer side at most
    flip_probability: float = 0.5
    crop_probability: float = 0.5  # probability of the resize-crop branch
    crop_resize_scales: tuple[int, ...] = (400, 500, 600)  # shorter side before the crop
    crop_min_size: int = 384  # crop height and width drawn from [min, max]
    crop_max_size: int = 600
    eval_size: int = 800  # evaluation: shorter side
    eval_max_size: int = 1333
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def scaled(self, factor: float) -> "TransformsConfig":
        """The same recipe with every pixel size multiplied by `factor` (rounded, deduplicated)."""

        def s(v: int) -> int:
            return max(1, int(round(v * factor)))

        return replace(
            self,
            train_scales=tuple(sorted({s(v) for v in self.train_scales})),
            max_size=s(self.max_size),
            crop_resize_scales=tuple(sorted({s(v) for v in self.crop_resize_scales})),
            crop_min_size=s(self.crop_min_size),
            crop_max_size=s(self.crop_max_size),
            eval_size=s(self.eval_size),
            eval_max_size=s(self.eval_max_size),
        )

    @classmethod
    def paper(cls) -> "TransformsConfig":
        return cls()

    @classmethod
    def small(cls) -> "TransformsConfig":
        """The paper's recipe at 0.16 scale: shorter sides 77..128, crops 61..96 (tests, CPU demos)."""
        return cls().scaled(0.16)

    @classmethod
    def native(cls) -> "TransformsConfig":
        """The recipe at 0.12 scale, about the own size of 64-160 px images (shorter sides 58..96,
        evaluation at 96): small images are not upscaled, which keeps training steps cheap."""
        return cls().scaled(0.12)

    def at_eval_size(self, size: int, max_size: int | None = None) -> "TransformsConfig":
        """The recipe evaluated at another shorter side (a speed/accuracy trade, as the official code's users
        make by resizing); the longer side's cap keeps the recipe's ratio unless given."""
        if size < 1 or (max_size is not None and max_size < size):
            raise RaydetrError(f"evaluation size {size} (longer side at most {max_size}): the shorter side must be "
                               ">= 1 and the longer side's cap at least the shorter side")
        if max_size is None:
            max_size = max(size, int(round(size * self.eval_max_size / self.eval_size)))
        return replace(self, eval_size=int(size), eval_max_size=int(max_size))

    @classmethod
    def preset(cls, name: str) -> "TransformsConfig":
        presets = {"paper": cls.paper, "small": cls.small, "native": cls.native}
        if name not in presets:
            raise RaydetrError(f"unknown transforms preset {name!r}; choose from {sorted(presets)}")
        return presets[name]()


class RandomSizeCrop(v2.Transform):
    """Crop a random region whose height and width are drawn from [min_size, max_size].

    DETR's RandomSizeCrop, as a v2 transform: the parameters are drawn here, the
    crop itself (image and boxes) is torchvision's `F.crop` kernel.
    """

    def __init__(self, min_size: int, max_size: int):
        super().__init__()
        if min_size > max_size:
            raise RaydetrError(f"min_size {min_size} > max_size {max_size}")
        self.min_size = min_size
        self.max_size = max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = next(F.get_size(x) for x in flat_inputs if isinstance(x, tv_tensors.Image))
        crop_w = min(width, int(torch.randint(self.min_size, max(self.min_size, min(width, self.max_size)) + 1, ())))
        crop_h = min(height, int(torch.randint(self.min_size, max(self.min_size, min(height, self.max_size)) + 1, ())))
        top = int(torch.randint(0, height - crop_h + 1, ()))
        left = int(torch.randint(0, width - crop_w + 1, ()))
        return {"top": top, "left": left, "height": crop_h, "width": crop_w}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


def _target_tensors(inputs: Any) -> tuple[torch.Tensor, ...]:
    target = inputs[1]
    return target["labels"], target["area"], target["index"]


def build_train_transform(config: TransformsConfig) -> v2.Transform:
    """Flip; then either multi-scale resize, or (p=crop_probability) resize + random crop + multi-scale resize."""
    multi_scale = v2.RandomShortestSize(min_size=list(config.train_scales), max_size=config.max_size, antialias=True)
    crop_branch = v2.Compose(
        [
            v2.RandomShortestSize(min_size=list(config.crop_resize_scales), antialias=True),
            RandomSizeCrop(config.crop_min_size, config.crop_max_size),
            v2.RandomShortestSize(min_size=list(config.train_scales), max_size=config.max_size, antialias=True),
        ]
    )
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(p=config.flip_probability),
            v2.RandomChoice([multi_scale, crop_branch], p=[1 - config.crop_probability, config.crop_probability]),
            v2.SanitizeBoundingBoxes(min_size=1, labels_getter=_target_tensors),
        ]
    )


def build_eval_transform(config: TransformsConfig) -> v2.Transform:
    """Shorter side to eval_size, longer side at most eval_max_size."""
    return v2.Compose(
        [
            v2.Resize(size=config.eval_size, max_size=config.eval_max_size, antialias=True),
            v2.SanitizeBoundingBoxes(min_size=1, labels_getter=_target_tensors),
        ]
    )


def build_transform(config: TransformsConfig, train: bool) -> v2.Transform:
    return build_train_transform(config) if train else build_eval_transform(config)


def image_seed(seed: int, epoch: int, image_id: int) -> int:
    """The per-image torch seed for an epoch: independent of worker, batch and order."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, epoch & 0xFFFFFFFF, image_id & 0xFFFFFFFF, (image_id >> 32) & 0xFFFFFFFF])
    return int(state.generate_state(1, dtype=np.uint64)[0] >> 1)


def apply_transform(
    transform: v2.Transform,
    image: np.ndarray,
    boxes_xywh: np.ndarray,
    labels: np.ndarray,
    area: np.ndarray,
    seed: int | None = None,
    masks: np.ndarray | None = None,
) -> dict[str, Any]:
    """Run a v2 transform on an HWC uint8 image and its COCO boxes (and their masks [N, H, W]).

    Returns `image` (uint8 [3,H,W] tensor, not normalised: that happens after
    transfer, in the collate function), `boxes` (float32 [N,4] normalised cx, cy,
    w, h), `labels` (int64 [N]), `area` (COCO area scaled with each box) and
    `size` (h, w), and with `masks` also `masks` (bool [N, h, w], moved exactly like the
    image and the boxes). With `seed`, torch's global generator is forked so the caller's
    random state is untouched.
    """
    img = tv_tensors.Image(torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1))
    h, w = img.shape[-2:]
    boxes = tv_tensors.BoundingBoxes(
        torch.as_tensor(np.asarray(boxes_xywh, dtype=np.float32).reshape(-1, 4)), format="XYWH", canvas_size=(h, w)
    )
    boxes = F.convert_bounding_box_format(boxes, new_format=tv_tensors.BoundingBoxFormat.XYXY)
    target = {
        "boxes": boxes,
        "labels": torch.as_tensor(np.asarray(labels, dtype=np.int64).reshape(-1)),
        "area": torch.as_tensor(np.asarray(area, dtype=np.float32).reshape(-1)),
        "index": torch.arange(len(boxes)),
    }
    if masks is not None:
        target["masks"] = tv_tensors.Mask(torch.from_numpy(np.ascontiguousarray(masks, dtype=bool)).reshape(-1, h, w))
    before = (boxes[:, 2:] - boxes[:, :2]).prod(dim=1).as_subclass(torch.Tensor)
    if seed is None:
        out_img, out = transform(img, target)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out_img, out = transform(img, target)
    oh, ow = out_img.shape[-2:]
    out_boxes = out["boxes"].as_subclass(torch.Tensor).float()
    after = (out_boxes[:, 2:] - out_boxes[:, :2]).prod(dim=1)
    scale = torch.as_tensor([ow, oh, ow, oh], dtype=torch.float32)
    normalised = box_convert(out_boxes, "xyxy", "cxcywh") / scale
    area_out = out["area"] * (after / before[out["index"]].clamp(min=1e-6))
    result = {
        "image": out_img.as_subclass(torch.Tensor).contiguous(),
        "boxes": normalised.float().reshape(-1, 4),
        "labels": out["labels"].long(),
        "area": area_out.float(),
        "size": (int(oh), int(ow)),
    }
    if masks is not None:
        result["masks"] = out["masks"].as_subclass(torch.Tensor).bool().reshape(-1, oh, ow)
    return result


def normalize_image(image: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 [3,H,W] -> float32 ImageNet-normalised [3,H,W]."""
    return F.normalize(F.to_dtype(image, torch.float32, scale=True), mean=list(mean), std=list(std))
