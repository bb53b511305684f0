"""Decoding and validation on real files: every bad case ends in the expected row or error."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from messy_data import SIZE, encode, rgb_image, write_messy_coco
from pipelines.sources import iter_records, open_source
from pipelines.validation import errors as E
from pipelines.validation.decode import DecodeLimits, decode_image, orient_boxes
from pipelines.validation.loading import load_record


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    root = tmp_path_factory.mktemp("messy")
    path, expected = write_messy_coco(str(root))
    source = open_source(path, images=str(root / "img"))
    results = {}
    for record in iter_records(source):
        loaded, errors = load_record(record, source.category_ids)
        results[record["key"]] = (loaded, errors)
    return results, expected


def test_every_image_ends_kept_or_in_the_errors_table(messy):
    results, expected = messy
    assert set(results) == set(expected)
    for name, want in expected.items():
        loaded, errors = results[name]
        if want == "kept":
            assert loaded is not None, (name, errors)
        else:
            assert loaded is None and [e.reason for e in errors] == [want], (name, errors)
            assert errors[0].image == name and name in errors[0].detail


def test_annotation_rules(messy):
    results, _ = messy
    loaded, errors = results["good.jpg"]
    assert sorted(e.reason for e in errors) == ["box_out_of_image", "degenerate_box", "unknown_category"]
    ann = loaded.annotations
    np.testing.assert_allclose(ann.boxes, [[8, 10, 16, 10], [50, 30, 14, 18], [30, 5, 10, 10]])
    assert ann.iscrowd.tolist() == [0, 0, 1]  # crowd kept as COCO keeps it
    assert loaded.repairs == [E.REPAIR_BOX_CLIPPED]
    negative, errs = results["negative.png"]
    assert errs == [] and negative.annotations is not None and len(negative.annotations.boxes) == 0


def test_colour_modes_are_converted_to_rgb(messy):
    results, _ = messy
    sixteen = results["sixteen.png"][0]
    assert sixteen.image.array.shape == (*SIZE, 3) and sixteen.image.array.dtype == np.uint8
    raw = (np.arange(SIZE[0] * SIZE[1]).reshape(SIZE) * 21).astype(np.uint16)
    np.testing.assert_array_equal(sixteen.image.array[..., 1], (raw // 257).astype(np.uint8))  # rescaled, not clipped
    cmyk = results["cmyk.jpg"][0]
    reference = np.asarray(rgb_image(4), dtype=np.float64)
    assert np.abs(cmyk.image.array - reference).mean() < 6
    assert E.REPAIR_CONVERTED_TO_RGB in cmyk.repairs and E.REPAIR_CONVERTED_TO_RGB in sixteen.repairs
    assert E.REPAIR_WRONG_EXTENSION in results["png_named.jpg"][0].repairs


def test_exif_rotated_image_and_its_boxes_turn_together(messy):
    loaded = messy[0]["rotated.jpg"][0]
    assert loaded.image.orientation == 6 and loaded.image.array.shape == (SIZE[1], SIZE[0], 3)
    red = (loaded.image.array[..., 0] > 180) & (loaded.image.array[..., 1] < 100)
    ys, xs = np.nonzero(red)
    drawn = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    np.testing.assert_allclose(loaded.annotations.boxes[0], drawn, atol=1)
    np.testing.assert_allclose(loaded.annotations.boxes[0], [28, 8, 10, 16], atol=1e-3)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_boxes_matches_pillow_for_every_orientation(orientation):
    arr = np.zeros((30, 50, 3), np.uint8)
    arr[4:12, 6:20] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    decoded = decode_image(encode(Image.fromarray(arr), "PNG", exif=exif), "x.png")
    ys, xs = np.nonzero(decoded.array[..., 0])
    moved = orient_boxes(np.array([[6, 4, 14, 8]]), orientation, (30, 50))[0]
    np.testing.assert_allclose(moved, [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1])
    back = orient_boxes(moved[None], orientation, decoded.array.shape[:2], inverse=True)[0]
    np.testing.assert_allclose(back, [6, 4, 14, 8])


def test_decompression_bomb_and_palette_images():
    big = encode(Image.new("RGB", (400, 300)), "PNG")
    with pytest.raises(E.PipelineError) as info:
        decode_image(big, "big.png", DecodeLimits(max_pixels=100_000))
    assert info.value.reason == E.TOO_LARGE and "400x300" in info.value.detail
    palette = rgb_image(8).convert("P")
    out = decode_image(encode(palette, "PNG"), "p.png")
    assert out.array.shape == (*SIZE, 3) and E.REPAIR_CONVERTED_TO_RGB in out.repairs
    rgba = decode_image(encode(rgb_image(9).convert("RGBA"), "PNG"), "a.png")
    np.testing.assert_array_equal(rgba.array, np.asarray(rgb_image(9)))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares a size and holds no pixels: opening it costs nothing, decoding it fails."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)) + chunk(
        b"IEND", b"")


def test_the_pixel_limit_is_the_jobs_not_pillows():
    bomb = png_header_only(20_000, 20_000)  # 400 megapixels: over twice Pillow's own default limit
    with pytest.raises(E.PipelineError) as info:
        decode_image(bomb, "bomb.png", DecodeLimits(max_pixels=100_000_000))
    assert info.value.reason == E.TOO_LARGE
    assert info.value.detail == "bomb.png: 400000000 pixels exceeds the limit of 100000000 (--max-pixels)"
    with pytest.raises(E.PipelineError) as info:  # a job that allows it: Pillow's default does not refuse it
        decode_image(bomb, "bomb.png", DecodeLimits(max_pixels=500_000_000))
    assert info.value.reason != E.TOO_LARGE
