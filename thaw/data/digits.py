"""scikit-learn's handwritten digits (1,797 real 8x8 scans) as an image folder, for the offline demo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from thaw.data.folders import stratified_split
from thaw.errors import ThawError


DIGITS = 1797  # scans in scikit-learn's set, 10 classes
SPLITS = ("train", "val", "test")


def write_digits_folder(root: Path, *, seed: int = 0, test_fraction: float = 0.2) -> Path:
    """train/val/test folders of PNGs (one class folder per digit); reused when already written whole. A folder
    holding anything else (a demo stopped while writing it, or another data set) is refused: it was scored as the
    digits, whatever it held."""
    if _holds_the_digits(root):
        return root
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ThawError(
            f"{root} holds files that are not the demo's digits (a demo stopped while writing them, or other data); "
            "remove it, or choose another --out"
        )
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ThawError("the demo needs scikit-learn (pip install scikit-learn)") from None
    digits = load_digits()
    samples = [(Path(f"{i:04d}.png"), int(label)) for i, label in enumerate(digits.target)]
    rest, test = stratified_split(samples, test_fraction, seed)
    train, val = stratified_split(rest, 0.25, seed)
    for split, chosen in (("train", train), ("val", val), ("test", test)):
        for name, label in chosen:
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (digits.images[int(name.stem)] * (255.0 / 16.0)).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(folder / name)
    return root


def _holds_the_digits(root: Path) -> bool:
    """Written whole: each split holds the ten class folders 0-9, and the splits 1,797 PNGs among them."""
    if not all((root / split).is_dir() for split in SPLITS):
        return False
    classes = {str(digit) for digit in range(10)}
    for split in SPLITS:
        if {entry.name for entry in (root / split).iterdir()} != classes:
            return False
    return sum(1 for split in SPLITS for _ in (root / split).glob("*/*.png")) == DIGITS
