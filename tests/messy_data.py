"""Real files with every problem the pipelines must survive, and what each must become."""
from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
from PIL import Image

SIZE = (48, 64)  # (height, width) of the test images


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def rgb_image(seed: int = 0, size: tuple[int, int] = SIZE) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = (rng.uniform(0, 80, (*size, 3))).astype(np.uint8)
    arr[10:20, 8:24] = (250, 20, 20)  # a red rectangle at x 8..23, y 10..19
    return Image.fromarray(arr)


def corrupt_jpeg() -> bytes:
    data = bytearray(encode(rgb_image(), "JPEG"))
    sos = data.index(b"\xff\xda")
    data[sos + 4: sos + 12] = b"\xff" * 8  # a broken scan header: identifies, then fails to decode
    return bytes(data)


def exif_rotated_jpeg() -> bytes:
    """Stored 48x64 with EXIF orientation 6 (display: rotate 90 degrees clockwise, 64x48)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(rgb_image(), "JPEG", quality=95, exif=exif)


def write_messy_coco(root: str) -> tuple[str, dict[str, str]]:
    """A COCO dataset under ROOT; returns (json path, {file name: "kept" or the expected reason})."""
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    h, w = SIZE
    files = {
        "good.jpg": encode(rgb_image(1), "JPEG", quality=95),
        "negative.png": encode(rgb_image(2), "PNG"),
        "corrupt.jpg": corrupt_jpeg(),
        "truncated.png": encode(rgb_image(3), "PNG")[:300],
        "zero.jpg": b"",
        "text.jpg": b"this is not an image\n",
        "sixteen.png": encode(Image.fromarray((np.arange(h * w).reshape(h, w) * 21).astype(np.uint16)), "PNG"),
        "cmyk.jpg": encode(rgb_image(4).convert("CMYK"), "JPEG", quality=95),
        "rotated.jpg": exif_rotated_jpeg(),
        "png_named.jpg": encode(rgb_image(5), "PNG"),
    }
    for name, data in files.items():
        with open(os.path.join(root, "img", name), "wb") as f:
            f.write(data)
    names = list(files) + ["missing.jpg"]
    images = [{"id": i + 1, "file_name": n, "height": h, "width": w} for i, n in enumerate(names)]
    ids = {n: i + 1 for i, n in enumerate(names)}
    anns = []

    def ann(name, bbox, cat=1, crowd=0):
        anns.append({"id": len(anns) + 1, "image_id": ids[name], "category_id": cat, "bbox": bbox,
                     "area": bbox[2] * bbox[3], "iscrowd": crowd})

    ann("good.jpg", [8, 10, 16, 10])  # kept as is
    ann("good.jpg", [50, 30, 30, 30])  # partly outside: clipped to [50, 30, 14, 18]
    ann("good.jpg", [100, 100, 10, 10])  # entirely outside: box_out_of_image
    ann("good.jpg", [5, 5, 0, 10])  # zero width: degenerate_box
    ann("good.jpg", [5, 5, 10, 10], cat=99)  # unknown_category
    ann("good.jpg", [30, 5, 10, 10], crowd=1)  # crowd: kept in annotations, not a training target
    ann("rotated.jpg", [8, 10, 16, 10], cat=2)  # on the stored pixels; display frame: [28, 8, 10, 16]
    for name in ("sixteen.png", "cmyk.jpg", "png_named.jpg", "corrupt.jpg"):
        ann(name, [1, 1, 10, 10])
    coco = {"images": images, "annotations": anns,
            "categories": [{"id": 1, "name": "red"}, {"id": 2, "name": "blue"}]}
    path = os.path.join(root, "messy.json")
    with open(path, "w") as f:
        json.dump(coco, f)
    expected = {
        "good.jpg": "kept", "negative.png": "kept", "sixteen.png": "kept", "cmyk.jpg": "kept",
        "rotated.jpg": "kept", "png_named.jpg": "kept",
        "corrupt.jpg": "decode_error", "truncated.png": "truncated", "zero.jpg": "zero_byte",
        "text.jpg": "not_an_image", "missing.jpg": "read_error",
    }
    return path, expected


def write_unsafe_tar(path: str) -> list[str]:
    """A tar with two good images, a `../` member, an absolute member and a symlink; returns good members."""
    good = {"a/one.png": encode(rgb_image(6), "PNG"), "two.jpg": encode(rgb_image(7), "JPEG")}
    with tarfile.open(path, "w:gz" if path.endswith(".gz") else "w") as tar:
        for name, data in [("a/one.png", good["a/one.png"]), ("../escape.jpg", good["two.jpg"]),
                           ("/abs/evil.png", good["a/one.png"]), ("two.jpg", good["two.jpg"]),
                           ("notes.txt", b"not an image, not listed")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link.jpg")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tar.addfile(link)
    return sorted(good)


def add_hostile_entries(coco_json: str, outside_image: str) -> dict[str, str]:
    """Append what a careless or hostile annotation file holds to a COCO JSON: entries that escape the image
    folder, ids that are no integers or repeat, an entry without a file name, and malformed annotations on
    its first image. Returns {image (as the errors table names it): expected reason}."""
    with open(coco_json) as f:
        coco = json.load(f)
    first = coco["images"][0]
    n = len(coco["images"])
    coco["images"] += [
        {"id": 1000, "file_name": "../outside/secret.jpg"},
        {"id": 1001, "file_name": outside_image},  # absolute
        {"id": "abc", "file_name": "badid.jpg"},
        {"id": 1002},
        {"id": first["id"], "file_name": "dup.jpg"},
    ]
    coco["annotations"] += [
        {"id": 900, "image_id": first["id"], "category_id": 1, "bbox": [1, 2, 3]},
        {"id": 901, "image_id": first["id"], "category_id": 1, "bbox": [1, "2", 3, 4]},
        {"id": 902, "image_id": first["id"], "category_id": "red", "bbox": [1, 2, 3, 4]},
    ]
    with open(coco_json, "w") as f:
        json.dump(coco, f)
    return {"../outside/secret.jpg": "unsafe_path", outside_image: "unsafe_path", "badid.jpg": "malformed_image_entry",
            f"images[{n + 3}]": "malformed_image_entry", "dup.jpg": "duplicate_image_id",
            first["file_name"]: "malformed_annotation"}
