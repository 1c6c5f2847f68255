"""Decoding what real folders contain."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from thaw.data.images import UnreadableImage, load_rgb, probe


def _rgb(path: Path) -> Image.Image:
    image = load_rgb(path)
    assert image.mode == "RGB"
    return image


def test_grayscale_palette_cmyk_and_16_bit(tmp_path: Path) -> None:
    Image.new("L", (10, 8), 128).save(tmp_path / "gray.png")
    Image.new("P", (10, 8), 3).save(tmp_path / "palette.png")
    Image.new("CMYK", (10, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    ramp = (np.arange(80, dtype=np.uint16).reshape(8, 10) * 800)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert _rgb(tmp_path / "gray.png").getpixel((0, 0)) == (128, 128, 128)
    assert _rgb(tmp_path / "palette.png").size == (10, 8)
    red = _rgb(tmp_path / "cmyk.jpg").getpixel((5, 4))
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    deep = _rgb(tmp_path / "deep.png")
    assert deep.getpixel((0, 0))[0] == 0 and deep.getpixel((9, 7))[0] == round(79 * 800 / 257)  # by its type's range


def test_deep_greyscale_decodes_as_its_8_bit_copy_not_stretched_by_its_own_range(tmp_path: Path) -> None:
    """Stretched by each image's own darkest and brightest pixel, a white 16-bit image decoded black, a faint one at
    full contrast, and a float image with one NaN pixel all black."""
    eight = np.random.default_rng(0).integers(100, 140, size=(8, 10), dtype=np.uint8)  # a faint picture
    Image.fromarray(eight).save(tmp_path / "eight.png")
    Image.fromarray(eight.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")  # the same picture, 16 bits
    Image.fromarray(np.full((8, 10), 65535, np.uint16)).save(tmp_path / "white.png")
    floats = eight.astype(np.float32) / 255
    floats[0, 0] = np.nan
    Image.fromarray(floats).save(tmp_path / "float.tiff")
    Image.fromarray(eight.astype(np.int32)).save(tmp_path / "int32.tiff")  # 8-bit values in a 32-bit type
    expected = np.asarray(_rgb(tmp_path / "eight.png"))
    assert np.array_equal(np.asarray(_rgb(tmp_path / "sixteen.png")), expected)
    assert np.array_equal(np.asarray(_rgb(tmp_path / "int32.tiff")), expected)
    assert set(np.asarray(_rgb(tmp_path / "white.png")).ravel()) == {255}
    float_rgb = np.asarray(_rgb(tmp_path / "float.tiff")).astype(int)
    assert float_rgb[0, 0, 0] == 0 and np.abs(float_rgb[1:] - expected[1:]).max() <= 1  # the NaN pixel alone is 0


def test_transparency_becomes_white(tmp_path: Path) -> None:
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    assert _rgb(tmp_path / "clear.png").getpixel((0, 0)) == (255, 255, 255)


def test_exif_rotation_is_applied(tmp_path: Path) -> None:
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert _rgb(tmp_path / "rotated.jpg").size == (20, 40)


def test_animated_gif_gives_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (6, 6), colour) for colour in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    pixel = _rgb(tmp_path / "anim.gif").getpixel((3, 3))
    assert pixel[0] > 200 and pixel[1] < 50


def test_tiny_images_load(tmp_path: Path) -> None:
    Image.new("RGB", (1, 1), (9, 9, 9)).save(tmp_path / "dot.png")
    assert _rgb(tmp_path / "dot.png").size == (1, 1)


def test_large_jpeg_decodes_at_reduced_size_when_asked(tmp_path: Path) -> None:
    Image.new("RGB", (2000, 1600), (10, 200, 10)).save(tmp_path / "big.jpg")
    reduced = load_rgb(tmp_path / "big.jpg", draft_size=512)
    assert 512 <= min(reduced.size) < 1600
    assert load_rgb(tmp_path / "big.jpg").size == (2000, 1600)


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("empty.jpg", b"", "empty file"),
        ("notes.jpg", b"these are my notes, not a photo\n", "not an image"),
        ("bomb.png", _png_header_only(20_000, 20_000), r"^too large: Image size \(400000000 pixels\) exceeds limit"),
    ],
)
def test_junk_is_refused_from_the_header(tmp_path: Path, name: str, content: bytes, reason: str) -> None:
    # train probes, predict decodes: a user reading both warnings must see one reason for one file.
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UnreadableImage, match=reason):
        probe(path)
    with pytest.raises(UnreadableImage, match=reason):
        load_rgb(path)


def test_a_link_to_nowhere_is_unreadable_with_its_target_named(tmp_path: Path) -> None:
    link = tmp_path / "broken.jpg"
    link.symlink_to(tmp_path / "moved" / "photo.jpg")
    for read in (probe, load_rgb):
        with pytest.raises(UnreadableImage, match=r"broken link to .*moved/photo\.jpg"):
            read(link)


def test_truncated_jpeg_fails_at_decode(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    probe(tmp_path / "cut.jpg")  # the header is fine
    with pytest.raises(UnreadableImage):
        load_rgb(tmp_path / "cut.jpg")
