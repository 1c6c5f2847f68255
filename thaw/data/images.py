"""Decoding that survives real folders: odd modes, EXIF rotation, animations, bombs, junk files."""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from thaw._io import special_kind

# Names that say "an image" (a manifest row names photo.jpg); thaw reads a file by its content, whatever its name.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".jfif", ".jpe", ".heic", ".avif")
# Pillow's own bomb threshold (about 89 MP); past it we skip the file instead of risking memory.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


class UnreadableImage(Exception):
    """A file that is not an image thaw can decode; the reason is the message."""


def _check_file(path: Path) -> None:
    """Something to open at all: not a link to nowhere, not empty. Shared by probe and load_rgb, so training and
    predict give one file the same reason."""
    try:
        status = path.stat()
    except FileNotFoundError:
        raise UnreadableImage(f"broken link to {os.readlink(path)}" if path.is_symlink() else "file not found") from None
    except OSError as error:  # a link loop, a file we may not read
        raise UnreadableImage(error.strerror or str(error)) from None
    if stat.S_ISDIR(status.st_mode):  # candidate_files lists a folder only where it cannot be listed
        raise UnreadableImage(f"a folder thaw cannot list: {_listing_error(path)}")
    if not stat.S_ISREG(status.st_mode):  # opening a named pipe would wait for a writer forever
        raise UnreadableImage(f"{special_kind(status.st_mode)}, not a regular file")
    size = status.st_size
    if size == 0:
        raise UnreadableImage("empty file")


def _listing_error(folder: Path) -> str:
    """Why `folder` cannot be listed, as the system says it (permission denied, an I/O error)."""
    try:
        with os.scandir(folder):
            return "it could not be listed when the data was read"  # listable now: it was not a moment ago
    except OSError as error:
        return (error.strerror or str(error)).lower()


def probe(path: Path) -> None:
    """Cheap check from the header: is this an image of a sane size? Raises UnreadableImage."""
    _check_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise UnreadableImage(_reason(error)) from None
    except OSError as error:
        raise UnreadableImage(str(error)) from None
    if width * height > MAX_PIXELS:
        raise UnreadableImage(f"{width}x{height} pixels is over the {MAX_PIXELS:,}-pixel safety limit")


def _reason(error: Exception) -> str:
    if isinstance(error, UnidentifiedImageError):
        return "not an image"
    return f"too large: {str(error).rstrip('.')}"  # Pillow's own words name the size and the limit


def _to_8bit(image: Image.Image) -> Image.Image:
    """16- and 32-bit greyscale (medical, scientific PNGs) scaled to 8 bits by the range their type holds, so that a
    16-bit and an 8-bit copy of one picture decode alike (stretching each image by its own darkest and brightest pixel
    made a white image black and a faint one full contrast). Only values no fixed range holds (negative, or past 16
    bits) are stretched by their own range; pixels that are not finite count as 0."""
    array = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(array.min()), float(array.max())
    if image.mode == "F" and low >= 0 and high <= 1:  # floats in [0, 1]: the usual scale of a float image
        scaled = array * 255.0
    elif image.mode.startswith("I;16") or (low >= 0 and 255 < high <= 65535):  # 16 bits, in the type or in the values
        scaled = array / 257.0
    elif low >= 0 and high <= 255:  # 8-bit values in a wider type
        scaled = array
    else:
        scaled = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def _flatten_alpha(image: Image.Image) -> Image.Image:
    """Transparent pixels become white, not whatever colour hides under the alpha."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def load_rgb(path: Path, draft_size: int | None = None) -> Image.Image:
    """An RGB image, upright, first frame; JPEGs decode at reduced size when `draft_size` allows."""
    _check_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if draft_size and image.format == "JPEG":
                    # Decode at 1/2, 1/4 or 1/8 scale while staying at least draft_size on each side.
                    image.draft("RGB", (draft_size, draft_size))
                image.seek(0)
                image.load()
                upright = ImageOps.exif_transpose(image)
                return _convert(upright)
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise UnreadableImage(_reason(error)) from None
    except (OSError, ValueError, SyntaxError) as error:
        raise UnreadableImage(str(error) or type(error).__name__) from None


def _convert(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _to_8bit(image).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        return _flatten_alpha(image)
    return image.convert("RGB")
