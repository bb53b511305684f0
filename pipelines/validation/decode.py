"""Decoding image bytes safely into RGB arrays, as every job needs them.

One function, `decode_image`, is the only place bytes become pixels: it rejects
empty, non-image, truncated, corrupt and oversized (decompression-bomb) files
with a stable reason, applies the EXIF orientation the camera recorded, and
converts every colour mode (grayscale, palette, RGBA, CMYK, 16-bit) to 8-bit RGB.
`orient_boxes` moves boxes annotated on the stored pixels the same way EXIF
orientation moves the pixels, with torchvision's box kernels.
"""
from __future__ import annotations

import io
import re
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipelines.validation import errors as E

EXIF_ORIENTATION_TAG = 0x0112
# PIL's own default bomb limit (about 89 megapixels); configurable per job.
DEFAULT_MAX_PIXELS = 89_478_485
DEFAULT_MAX_BYTES = 256 * 1024 * 1024

_FORMAT_EXTENSIONS = {
    "JPEG": (".jpg", ".jpeg", ".jpe", ".jfif"),
    "PNG": (".png",),
    "GIF": (".gif",),
    "BMP": (".bmp", ".dib"),
    "TIFF": (".tif", ".tiff"),
    "WEBP": (".webp",),
    "MPO": (".jpg", ".jpeg", ".mpo"),
}
# Leading bytes of the common image formats: a file that starts like an image but cannot
# be opened is corrupt, one that does not is not an image at all.
_PILLOW_LIMIT_LOCK = threading.Lock()


@contextmanager
def _pillow_pixel_limit(max_pixels: int) -> Iterator[None]:
    """Pillow's own bomb check (in `Image.open`, before any pixel is allocated) at the job's limit instead of
    its global default, which would reject images a job allows and name a limit the job did not set."""
    with _PILLOW_LIMIT_LOCK:
        before, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = before


def _too_many_pixels(label: str, pixels: str, limit: int) -> E.PipelineError:
    return E.PipelineError(E.TOO_LARGE, f"{label}: {pixels} pixels exceeds the limit of {limit} (--max-pixels)")


_IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*", b"RIFF")


@dataclass(frozen=True)
class DecodeLimits:
    """Limits that protect a worker from a hostile or broken file."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES


@dataclass
class DecodedImage:
    """An image as 8-bit RGB pixels [H, W, 3] in display orientation, plus what was done to it."""

    array: np.ndarray
    orientation: int = 1
    stored_size: tuple[int, int] = (0, 0)  # (height, width) of the pixels as stored in the file
    format: str = ""
    repairs: list[str] = field(default_factory=list)

    @property
    def height(self) -> int:
        return int(self.array.shape[0])

    @property
    def width(self) -> int:
        return int(self.array.shape[1])


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; 16/32-bit integer and float modes are rescaled, not clipped."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img)
        if mode == "F":
            arr = arr.astype(np.float64)
            scale = 255.0 if float(np.nanmax(arr, initial=0.0)) <= 1.0 else 1.0
            arr8 = np.clip(np.nan_to_num(arr) * scale, 0, 255).astype(np.uint8)
        else:
            arr = arr.astype(np.int64)
            # 16-bit data (I;16*, or 32-bit "I" holding 16-bit values) maps 0..65535 -> 0..255.
            is16 = mode.startswith("I;16") or int(arr.max(initial=0)) > 255
            arr8 = np.clip(arr // 257 if is16 else arr, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if mode in ("P", "PA") and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def _classify_decode_failure(exc: BaseException) -> str:
    text = str(exc).lower()
    if isinstance(exc, EOFError) or "truncated" in text or "premature end" in text:
        return E.TRUNCATED
    return E.DECODE_ERROR


def extension_matches(name: str, fmt: str) -> bool:
    """Whether a file name's extension fits the format Pillow found in its bytes."""
    lower = name.lower()
    if "." not in lower.rsplit("/", 1)[-1]:
        return True
    return lower.endswith(_FORMAT_EXTENSIONS.get(fmt, (lower[lower.rfind("."):],)))


def decode_image(data: bytes, name: str = "", limits: DecodeLimits = DecodeLimits()) -> DecodedImage:
    """Decode image bytes to RGB in display orientation, or raise `PipelineError(reason, detail)`.

    Reasons: zero_byte, too_large, not_an_image, truncated, decode_error. Repairs
    recorded on the result: exif_rotated, converted_to_rgb, wrong_extension.
    """
    label = name or "<bytes>"
    if data is None or len(data) == 0:
        raise E.PipelineError(E.ZERO_BYTE, f"{label}: file is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise E.PipelineError(E.TOO_LARGE, f"{label}: {len(data)} bytes exceeds the limit of {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the check below says it with the size
            with _pillow_pixel_limit(limits.max_pixels):  # errors at twice the limit, before reading pixels
                img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > limits.max_pixels:
                raise _too_many_pixels(label, f"{width}x{height}", limits.max_pixels)
            img.load()
    except E.PipelineError:
        raise
    except UnidentifiedImageError:
        if data.startswith(_IMAGE_SIGNATURES):
            raise E.PipelineError(E.DECODE_ERROR, f"{label}: corrupt image header") from None
        raise E.PipelineError(E.NOT_AN_IMAGE, f"{label}: the bytes are not a recognised image format") from None
    except Image.DecompressionBombError as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))  # Pillow's message: "Image size (N pixels) exceeds ..."
        raise _too_many_pixels(label, found.group(1) if found else "more", limits.max_pixels) from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        raise E.PipelineError(_classify_decode_failure(exc), f"{label}: {type(exc).__name__}: {exc}") from None

    repairs: list[str] = []
    fmt = img.format or ""
    if name and fmt and not extension_matches(name, fmt):
        repairs.append(E.REPAIR_WRONG_EXTENSION)
    try:
        orientation = int(img.getexif().get(EXIF_ORIENTATION_TAG, 1) or 1)
    except Exception:  # a broken EXIF block must not reject an otherwise good image
        orientation = 1
    if orientation not in range(1, 9):
        orientation = 1
    stored_size = (height, width)
    if orientation != 1:
        img = ImageOps.exif_transpose(img)
        repairs.append(E.REPAIR_EXIF_ROTATED)
    if img.mode != "RGB":
        img = _to_rgb(img)
        repairs.append(E.REPAIR_CONVERTED_TO_RGB)
    array = np.asarray(img, dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise E.PipelineError(E.DECODE_ERROR, f"{label}: decoded to an unusable array of shape {array.shape}")
    return DecodedImage(array=array, orientation=orientation, stored_size=stored_size, format=fmt, repairs=repairs)


# EXIF orientation -> the torchvision operations (applied in order) that take the stored
# frame to the display frame, mirroring PIL's ImageOps.exif_transpose.
_ORIENTATION_OPS: dict[int, tuple[str, ...]] = {
    1: (),
    2: ("hflip",),
    3: ("rot180",),
    4: ("vflip",),
    5: ("hflip", "rot90"),
    6: ("rot270",),
    7: ("rot270", "vflip"),
    8: ("rot90",),
}
_INVERSE_ORIENTATION = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 8, 7: 7, 8: 6}


def orient_boxes(
    boxes_xywh: np.ndarray, orientation: int, frame_size: tuple[int, int], inverse: bool = False
) -> np.ndarray:
    """Move COCO (x, y, w, h) boxes from the stored frame to the display frame (or back).

    `frame_size` is (height, width) of the frame the boxes are in. Uses
    torchvision.transforms.v2.functional on tv_tensors.BoundingBoxes.
    """
    boxes_xywh = np.asarray(boxes_xywh, dtype=np.float64).reshape(-1, 4)
    if inverse:
        orientation = _INVERSE_ORIENTATION.get(orientation, 1)
    ops = _ORIENTATION_OPS.get(orientation, ())
    if not ops or len(boxes_xywh) == 0:
        return boxes_xywh.copy()
    import torch
    from torchvision import tv_tensors
    from torchvision.transforms.v2 import functional as F

    boxes = tv_tensors.BoundingBoxes(
        torch.as_tensor(boxes_xywh), format="XYWH", canvas_size=tuple(int(s) for s in frame_size)
    )
    for op in ops:
        if op == "hflip":
            boxes = F.horizontal_flip(boxes)
        elif op == "vflip":
            boxes = F.vertical_flip(boxes)
        else:
            boxes = F.rotate(boxes, angle=float(op[3:]), expand=True)
    # Rotations by multiples of 90 degrees are exact up to float rounding of cos/sin.
    return np.round(boxes.as_subclass(torch.Tensor).numpy().astype(np.float64), 4)


def probe_image(data: bytes, name: str = "") -> tuple[tuple[int, int], int]:
    """((height, width) as stored, EXIF orientation) from the header only, without decoding pixels.

    Raises PipelineError(zero_byte | not_an_image | decode_error) like `decode_image`.
    """
    label = name or "<bytes>"
    if not data:
        raise E.PipelineError(E.ZERO_BYTE, f"{label}: file is empty (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        try:
            orientation = int(img.getexif().get(EXIF_ORIENTATION_TAG, 1) or 1)
        except Exception:
            orientation = 1
    except UnidentifiedImageError:
        reason = E.DECODE_ERROR if data.startswith(_IMAGE_SIGNATURES) else E.NOT_AN_IMAGE
        raise E.PipelineError(reason, f"{label}: cannot read the image header") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise E.PipelineError(E.DECODE_ERROR, f"{label}: {type(exc).__name__}: {exc}") from None
    return (height, width), (orientation if orientation in range(1, 9) else 1)


def display_size(stored_size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """(height, width) after applying the EXIF orientation (5..8 swap the axes)."""
    return (stored_size[1], stored_size[0]) if orientation in (5, 6, 7, 8) else tuple(stored_size)
