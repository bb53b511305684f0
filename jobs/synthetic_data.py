"""A synthetic COCO dataset: coloured shapes on textured backgrounds, fast and seeded.

The class of an object is its shape (circle, square, triangle, ...); its colour,
size and position are random and carry no class information, and backgrounds
are noise, gradients, stripes or checks, so a detector has to learn shape.
Every image is rendered from its own generator, seeded by (seed, image index),
so the same options always give the same files whichever process renders them.

Rendering keeps an instance map (which object owns each pixel), and each box is
the exact extent of the pixels its object shows after occlusion; the area is its
visible pixel count.

Panoptic mode (`panoptic=True`): the background is one or two regions (split by a
random straight line), each filled with the texture of a stuff class (noise,
gradient, stripes or checks: the class is the texture, its colours are random);
shapes are things on top. The dataset is then written in COCO panoptic format:
OUT/panoptic_{split}.json (categories with `isthing`) and one segment-id PNG per
image in OUT/panoptic_{split}/, plus the usual instances JSON of the things.
"""
from __future__ import annotations

import io
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from detr.errors import RaydetrError

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon")
BACKGROUNDS = ("noise", "gradient", "stripes", "checks")
STUFF = BACKGROUNDS
"""Stuff classes of the panoptic mode, in id order after the shapes: the background textures."""


@dataclass(frozen=True)
class SyntheticConfig:
    """What `detr make-dataset` generates; every option has its one default here."""

    images: int = 200
    classes: int = 4  # the first `classes` entries of SHAPES, category ids 1..classes
    min_objects: int = 1
    max_objects: int = 4
    min_object_size: int = 16  # side of the shape's bounding square, pixels
    max_object_size: int = 48
    min_image_size: int = 64  # each side drawn independently from [min, max]
    max_image_size: int = 128
    max_overlap: float = 0.0  # largest IoU allowed between two objects' boxes
    val_fraction: float = 0.0  # fraction of images written to val.json instead of train.json
    seed: int = 0
    image_format: str = "png"  # "png" (lossless, exact pixels) or "jpg"
    jpeg_quality: int = 90
    panoptic: bool = False  # background regions of stuff classes; COCO panoptic output
    stuff_classes: int = 4  # panoptic: the first `stuff_classes` of STUFF, ids classes+1 ..

    def __post_init__(self):
        if not 1 <= self.classes <= len(SHAPES):
            raise RaydetrError(f"classes must be between 1 and {len(SHAPES)} (the shapes available)")
        if not 0 <= self.min_objects <= self.max_objects:
            raise RaydetrError("need 0 <= min_objects <= max_objects")
        if not 1 <= self.min_object_size <= self.max_object_size:
            raise RaydetrError("need 1 <= min_object_size <= max_object_size")
        if not 8 <= self.min_image_size <= self.max_image_size:
            raise RaydetrError("need 8 <= min_image_size <= max_image_size")
        if self.max_object_size > self.min_image_size:
            raise RaydetrError("max_object_size must fit in the smallest image (<= min_image_size)")
        if not 0.0 <= self.val_fraction < 1.0:
            raise RaydetrError("val_fraction must be in [0, 1)")
        if self.image_format not in ("png", "jpg"):
            raise RaydetrError("image_format must be 'png' or 'jpg'")
        if self.panoptic and not 1 <= self.stuff_classes <= len(STUFF):
            raise RaydetrError(f"stuff_classes must be between 1 and {len(STUFF)}")

    def categories(self) -> list[dict]:
        return [{"id": i + 1, "name": SHAPES[i], "supercategory": "shape"} for i in range(self.classes)]

    def panoptic_categories(self) -> list[dict]:
        """Things (the shapes, isthing 1) then stuff (the textures, isthing 0)."""
        things = [{**c, "isthing": 1} for c in self.categories()]
        stuff = [{"id": self.classes + 1 + i, "name": STUFF[i], "supercategory": "texture", "isthing": 0}
                 for i in range(self.stuff_classes)]
        return things + stuff


@dataclass
class Rendered:
    """One rendered image: pixels, the instance map (0 = background, i = object i), and the objects."""

    image: np.ndarray  # uint8 [H, W, 3]
    instance_map: np.ndarray  # int32 [H, W]
    objects: list[dict] = field(default_factory=list)  # category_id, bbox (x, y, w, h), area
    stuff_map: np.ndarray | None = None  # panoptic: int32 [H, W] stuff category id of the background


def _shape_mask(shape: str, size: int) -> np.ndarray:
    """A boolean mask of `shape` filling a size x size square."""
    if shape in ("circle", "ring"):
        yy, xx = np.mgrid[:size, :size] + 0.5
        r2 = (xx - size / 2) ** 2 + (yy - size / 2) ** 2
        outer = r2 <= (size / 2) ** 2
        return outer & (r2 >= (size * 0.3) ** 2) if shape == "ring" else outer
    if shape == "square":
        return np.ones((size, size), dtype=bool)
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    s = size - 1
    if shape == "triangle":
        pts = [(s / 2, 0), (s, s), (0, s)]
    elif shape == "diamond":
        pts = [(s / 2, 0), (s, s / 2), (s / 2, s), (0, s / 2)]
    elif shape == "hexagon":
        pts = [(s / 2 + s / 2 * np.cos(a), s / 2 + s / 2 * np.sin(a)) for a in np.arange(6) * np.pi / 3]
    elif shape == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, s / 2, s / 5)
        pts = [(s / 2 + r * np.cos(a), s / 2 + r * np.sin(a)) for r, a in zip(radii, angles)]
    elif shape == "cross":
        t = size / 3
        draw.rectangle([t, 0, s - t, s], fill=255)
        draw.rectangle([0, t, s, s - t], fill=255)
        return np.asarray(canvas) > 0
    else:
        raise RaydetrError(f"unknown shape {shape!r}")
    draw.polygon(pts, fill=255)
    return np.asarray(canvas) > 0


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    return _texture(rng, kind, h, w)


def _texture(rng: np.random.Generator, kind: str, h: int, w: int) -> np.ndarray:
    c1, c2 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    if kind == "noise":
        coarse = rng.uniform(0, 1, (h // 16 + 2, w // 16 + 2, 1)).astype(np.float32)
        t = np.asarray(Image.fromarray((coarse[..., 0] * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR),
                       dtype=np.float32)[..., None] / 255.0
    elif kind == "gradient":
        a = rng.uniform(0, 2 * np.pi)
        t = (np.cos(a) * xx + np.sin(a) * yy)
        t = ((t - t.min()) / max(float(np.ptp(t)), 1.0))[..., None]
    elif kind == "stripes":
        a, period = rng.uniform(0, np.pi), rng.uniform(6, 24)
        t = (0.5 + 0.5 * np.sin(2 * np.pi * (np.cos(a) * xx + np.sin(a) * yy) / period))[..., None]
    else:
        cell = int(rng.integers(6, 20))
        t = (((xx // cell) + (yy // cell)) % 2)[..., None]
    img = c1 * (1 - t) + c2 * t + rng.normal(0, 8, (h, w, 1))
    return np.clip(img, 0, 255).astype(np.uint8)


def _iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / float(a[2] * a[3] + b[2] * b[3] - inter)


def _stuff_background(config: SyntheticConfig, rng: np.random.Generator, h: int, w: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """One region, or two split by a random line, each textured as a different stuff class."""
    regions = 1 if config.stuff_classes == 1 or rng.uniform() < 1 / 3 else 2
    kinds = rng.choice(config.stuff_classes, size=regions, replace=False)
    image = _texture(rng, STUFF[int(kinds[0])], h, w)
    stuff_map = np.full((h, w), config.classes + 1 + int(kinds[0]), dtype=np.int32)
    if regions == 2:
        yy, xx = np.mgrid[:h, :w].astype(np.float32)
        a = rng.uniform(0, 2 * np.pi)
        cx, cy = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h
        second = np.cos(a) * (xx - cx) + np.sin(a) * (yy - cy) > 0
        image[second] = _texture(rng, STUFF[int(kinds[1])], h, w)[second]
        stuff_map[second] = config.classes + 1 + int(kinds[1])
    return image, stuff_map


def render_image(config: SyntheticConfig, index: int) -> Rendered:
    """Render image `index`: deterministic in (config.seed, index)."""
    rng = np.random.default_rng([config.seed, index])
    h = int(rng.integers(config.min_image_size, config.max_image_size + 1))
    w = int(rng.integers(config.min_image_size, config.max_image_size + 1))
    stuff_map = None
    if config.panoptic:
        image, stuff_map = _stuff_background(config, rng, h, w)
    else:
        image = _background(rng, h, w)
    instance_map = np.zeros((h, w), dtype=np.int32)
    n = int(rng.integers(config.min_objects, config.max_objects + 1))
    placed: list[tuple[int, tuple[int, int, int, int]]] = []
    for _ in range(n):
        for _attempt in range(30):
            size = int(rng.integers(config.min_object_size, config.max_object_size + 1))
            x, y = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
            square = (x, y, size, size)
            if all(_iou(square, other) <= config.max_overlap for _, other in placed):
                break
        else:
            continue  # no room left for another object within the overlap limit
        category = int(rng.integers(config.classes)) + 1
        mask = _shape_mask(SHAPES[category - 1], size)
        region = image[y:y + size, x:x + size]
        base = region[mask].mean(axis=0) if mask.any() else np.zeros(3)
        colour = rng.uniform(0, 255, 3)
        while np.abs(colour - base).sum() < 150:  # keep the shape visible against its background
            colour = rng.uniform(0, 255, 3)
        region[mask] = colour.astype(np.uint8)
        instance_map[y:y + size, x:x + size][mask] = len(placed) + 1
        placed.append((category, square))
    objects = []
    for i, (category, _) in enumerate(placed, start=1):
        ys, xs = np.nonzero(instance_map == i)
        if len(xs) == 0:
            continue  # fully covered by later objects
        x0, y0 = int(xs.min()), int(ys.min())
        objects.append({"category_id": category, "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1],
                        "area": int(len(xs)), "instance": i})
    return Rendered(image, instance_map, objects, stuff_map)


def panoptic_segments(rendered: Rendered) -> tuple[np.ndarray, list[dict]]:
    """(segment-id map [H, W], COCO `segments_info`): things with their instance ids, then one
    segment per stuff class for the background pixels no shape covers."""
    ids = np.zeros(rendered.instance_map.shape, dtype=np.int64)
    info = []
    for obj in rendered.objects:
        ids[rendered.instance_map == obj["instance"]] = obj["instance"]
        info.append({"id": int(obj["instance"]), "category_id": int(obj["category_id"]), "iscrowd": 0,
                     "bbox": list(obj["bbox"]), "area": int(obj["area"])})
    next_id = int(rendered.instance_map.max()) + 1
    if rendered.stuff_map is not None:
        background = rendered.instance_map == 0
        for category in np.unique(rendered.stuff_map[background]).tolist():
            region = background & (rendered.stuff_map == category)
            ys, xs = np.nonzero(region)
            ids[region] = next_id
            info.append({"id": next_id, "category_id": int(category), "iscrowd": 0,
                         "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min()) + 1,
                                  int(ys.max() - ys.min()) + 1], "area": int(len(xs))})
            next_id += 1
    return ids, info


def encode(image: np.ndarray, fmt: str, jpeg_quality: int = 90) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        Image.fromarray(image).save(buf, "PNG", compress_level=1)
    else:
        Image.fromarray(image).save(buf, "JPEG", quality=jpeg_quality)
    return buf.getvalue()


def _render_and_write(args: tuple[SyntheticConfig, str, int]) -> list:
    config, out, index = args
    rendered = render_image(config, index)
    name = f"{index:06d}.{config.image_format}"
    with open(os.path.join(out, "images", name), "wb") as f:
        f.write(encode(rendered.image, config.image_format, config.jpeg_quality))
    h, w = rendered.image.shape[:2]
    segments = None
    if config.panoptic:
        from pipelines.validation.panoptic import encode_panoptic_png

        ids, segments = panoptic_segments(rendered)
        split = "val" if split_of(config)[index] else "train"
        with open(os.path.join(out, f"panoptic_{split}", f"{index:06d}.png"), "wb") as f:
            f.write(encode_panoptic_png(ids))
    return [{"file_name": f"images/{name}", "height": h, "width": w}, rendered.objects, segments]


def split_of(config: SyntheticConfig) -> np.ndarray:
    """A boolean array: True for images in the validation split (a seeded random subset)."""
    n_val = int(round(config.images * config.val_fraction))
    is_val = np.zeros(config.images, dtype=bool)
    is_val[np.random.default_rng([config.seed, 2**31]).permutation(config.images)[:n_val]] = True
    return is_val


def write_dataset(out: str, config: SyntheticConfig, workers: int = 1) -> dict[str, str]:
    """Write OUT/images/*, OUT/train.json (and OUT/val.json), and in panoptic mode OUT/panoptic_train.json
    with OUT/panoptic_train/*.png (and the same for val); returns the JSON paths by split name.

    File names in the JSONs are relative to OUT, so `open_source("OUT/train.json")` just works.
    """
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    if config.panoptic:
        for split in ("train", "val"):
            os.makedirs(os.path.join(out, f"panoptic_{split}"), exist_ok=True)
    jobs = [(config, out, i) for i in range(config.images)]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(_render_and_write, jobs, chunksize=32))
    else:
        results = [_render_and_write(j) for j in jobs]
    is_val = split_of(config)
    splits = {"train": {"images": [], "annotations": [], "panoptic": []},
              "val": {"images": [], "annotations": [], "panoptic": []}}
    next_ann = 1
    for index, (image_info, objects, segments) in enumerate(results):
        split = splits["val" if is_val[index] else "train"]
        image_id = index + 1
        split["images"].append({"id": image_id, **image_info})
        if segments is not None:
            split["panoptic"].append({"image_id": image_id, "file_name": f"{index:06d}.png", "segments_info": segments})
        for obj in objects:
            split["annotations"].append({"id": next_ann, "image_id": image_id, "category_id": obj["category_id"],
                                         "bbox": obj["bbox"], "area": obj["area"], "iscrowd": 0})
            next_ann += 1
    paths = {}
    for name, split in splits.items():
        if name == "val" and not split["images"]:
            continue
        coco = {"info": {"description": "raydetr synthetic shapes", "config": asdict(config)},
                "images": split["images"], "annotations": split["annotations"], "categories": config.categories()}
        paths[name] = os.path.join(out, f"{name}.json")
        with open(paths[name], "w") as f:
            json.dump(coco, f)
        if config.panoptic:
            panoptic = {"info": coco["info"], "images": split["images"], "annotations": split["panoptic"],
                        "categories": config.panoptic_categories()}
            paths[f"panoptic_{name}"] = os.path.join(out, f"panoptic_{name}.json")
            with open(paths[f"panoptic_{name}"], "w") as f:
                json.dump(panoptic, f)
    if config.panoptic and not splits["val"]["images"]:
        os.rmdir(os.path.join(out, "panoptic_val"))
    return paths
