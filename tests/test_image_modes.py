"""`read_image` turns every PIL mode found in the wild into the right 8-bit RGB.

Each test builds the image with PIL, saves it in a format that keeps that mode, reads it back with
`read_image` and compares the pixels with 8-bit values computed here from the stored values.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL_IMAGE
from PIL import Image, PngImagePlugin
from test_search import _merged, _save_run

from upperson.data import ImageDataset, build_transforms, read_image
from upperson.retrieval.gallery import GalleryIndex


def _row(mode: str, values: list) -> Image.Image:
    """A one-row image of ``values`` in ``mode`` (grey modes: one number per pixel)."""
    image = Image.new(mode, (len(values), 1))
    for x, value in enumerate(values):
        image.putpixel((x, 0), value)
    return image


def _read(image: Image.Image, path: Path, expected_mode: str, **save_options: object) -> list[tuple[int, int, int]]:
    image.save(path, **save_options)
    with Image.open(path) as stored:
        assert stored.mode == expected_mode  # the file really holds the mode under test
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. Pillow's "Palette images with Transparency" warning
        rgb = read_image(path)
    assert rgb.mode == "RGB" and rgb.size == image.size
    return [rgb.getpixel((x, 0)) for x in range(image.width)]


def _grey(levels: list[int]) -> list[tuple[int, int, int]]:
    return [(level, level, level) for level in levels]


def test_bilevel_and_8_bit_grey(tmp_path: Path) -> None:
    assert _read(_row("1", [0, 1, 0]), tmp_path / "bilevel.png", "1") == _grey([0, 255, 0])
    assert _read(_row("L", [0, 17, 128, 255]), tmp_path / "grey.png", "L") == _grey([0, 17, 128, 255])


STORED_16 = [0, 255, 256, 257 * 10, 257 * 200 + 100, 40_000, 65_535]


@pytest.mark.parametrize(("mode", "suffix"), [("I;16", ".png"), ("I;16", ".tif"), ("I;16B", ".tif")])
def test_16_bit_grey_is_scaled_not_clipped(tmp_path: Path, mode: str, suffix: str) -> None:
    expected = _grey([value // 256 for value in STORED_16])  # the top 8 of 16 bits
    assert expected[3] == (10, 10, 10) and expected[-1] == (255, 255, 255)
    assert _read(_row(mode, STORED_16), tmp_path / f"grey16{suffix}", mode) == expected


def test_16_bit_png_that_pillow_opens_as_mode_i(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Older Pillow opens 16-bit grey PNGs as 32-bit ``I``; the PNG's 16 bits must still be used."""
    path = tmp_path / "grey16.png"
    _row("I;16", STORED_16).save(path)
    monkeypatch.setitem(PngImagePlugin._MODES, (16, 0), ("I", "I;16B"))
    with Image.open(path) as stored:
        assert stored.mode == "I"
    rgb = read_image(path)
    assert [rgb.getpixel((x, 0)) for x in range(len(STORED_16))] == _grey([value // 256 for value in STORED_16])


def test_32_bit_signed_integer_tiff(tmp_path: Path) -> None:
    stored = np.array([[0, 10 << 23, (200 << 23) + 12345, 2**31 - 1, -5, 1 << 22]], dtype=np.int32)
    image = Image.fromarray(stored)
    assert image.mode == "I"
    # 31 value bits of a signed 32-bit sample: the top 8 of them, negatives black
    assert _read(image, tmp_path / "grey32.tif", "I") == _grey([0, 10, 200, 255, 0, 0])


def test_float_grey_in_unit_range_and_in_8_bit_range(tmp_path: Path) -> None:
    unit = Image.fromarray(np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32))
    assert _read(unit, tmp_path / "unit.tif", "F") == _grey([0, 64, 128, 255])  # round(v * 255)
    scaled = Image.fromarray(np.array([[0.0, 12.4, 200.6, 300.0, -3.0]], dtype=np.float32))
    assert _read(scaled, tmp_path / "scaled.tif", "F") == _grey([0, 12, 201, 255, 0])


PALETTE = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]


def _palette_image() -> Image.Image:
    image = _row("P", [0, 1, 2, 1])
    image.putpalette([channel for colour in PALETTE for channel in colour])
    return image


def test_palette_with_and_without_transparency(tmp_path: Path) -> None:
    expected = [PALETTE[index] for index in (0, 1, 2, 1)]
    assert _read(_palette_image(), tmp_path / "palette.png", "P") == expected
    single = _palette_image()
    single.info["transparency"] = 1  # one transparent index (tRNS)
    assert _read(single, tmp_path / "single.png", "P") == expected
    per_entry = _palette_image()
    per_entry.info["transparency"] = bytes([255, 0, 128])  # alpha per palette entry
    assert _read(per_entry, tmp_path / "per_entry.png", "P") == expected
    gif = _palette_image()
    assert _read(gif, tmp_path / "palette.gif", "P", transparency=2) == expected


def test_alpha_is_dropped_keeping_the_stored_colour(tmp_path: Path) -> None:
    rgba = _row("RGBA", [(10, 20, 30, 0), (200, 100, 50, 128), (1, 2, 3, 255)])
    assert _read(rgba, tmp_path / "rgba.png", "RGBA") == [(10, 20, 30), (200, 100, 50), (1, 2, 3)]
    grey_alpha = _row("LA", [(100, 0), (7, 255)])
    assert _read(grey_alpha, tmp_path / "la.png", "LA") == _grey([100, 7])


CMYK = [(0, 0, 0, 0), (10, 20, 30, 0), (40, 80, 120, 60), (0, 0, 0, 255)]


def _cmyk_to_rgb(c: int, m: int, y: int, k: int) -> tuple[int, int, int]:
    return tuple(round((255 - ink) * (255 - k) / 255) for ink in (c, m, y))


def test_cmyk_tiff(tmp_path: Path) -> None:
    pixels = _read(_row("CMYK", CMYK), tmp_path / "cmyk.tif", "CMYK")
    for found, ink in zip(pixels, CMYK, strict=True):
        assert np.abs(np.subtract(found, _cmyk_to_rgb(*ink))).max() <= 1
    assert pixels[1] == (245, 235, 225)  # no black ink: exactly 255 - ink


def test_cmyk_jpeg(tmp_path: Path) -> None:
    image = Image.new("CMYK", (16, 16), (40, 80, 120, 60))
    pixels = _read(image, tmp_path / "cmyk.jpg", "CMYK", quality=100)
    assert np.abs(np.subtract(pixels[8], _cmyk_to_rgb(40, 80, 120, 60))).max() <= 2  # lossy


def test_rgb_png_and_jpeg(tmp_path: Path) -> None:
    assert _read(_row("RGB", [(1, 2, 3), (250, 128, 0)]), tmp_path / "rgb.png", "RGB") == [(1, 2, 3), (250, 128, 0)]
    pixels = _read(Image.new("RGB", (16, 16), (200, 30, 90)), tmp_path / "rgb.jpg", "RGB", quality=100)
    assert np.abs(np.subtract(pixels[8], (200, 30, 90))).max() <= 2


def test_decompression_bombs_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "bomb.png"
    Image.new("L", (40, 40)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1600 pixels is more than twice the limit
    with pytest.raises(Image.DecompressionBombError):
        read_image(path)
    assert ImageDataset([path], [0], build_transforms((32, 16), train=False))[0] is None  # skipped, not loaded


def test_gallery_encodes_a_16_bit_png_like_its_8_bit_copy(tmp_path: Path) -> None:
    _, adapter = _save_run(tmp_path / "run")
    stored = (np.arange(48 * 24, dtype=np.uint16).reshape(48, 24) * 57 + 1000).astype(np.uint16)  # [H, W]
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    Image.fromarray(stored).save(gallery / "deep.png")
    Image.fromarray((stored >> 8).astype(np.uint8)).save(gallery / "flat.png")
    index = GalleryIndex.build(_merged(adapter), gallery, tmp_path / "index", adapter=adapter, image_size=SMALL_IMAGE)
    assert index.paths == ["deep.png", "flat.png"]
    assert np.array_equal(index.features[0].numpy(), index.features[1].numpy())
