"""scikit-learn's handwritten digits (1,797 real 8x8 scans) as an image folder, for the offline demo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from thaw.data.folders import stratified_split
from thaw.errors import ThawError


def write_digits_folder(root: Path, *, seed: int = 0, test_fraction: float = 0.2) -> Path:
    """train/val/test folders of PNGs (one class folder per digit); reused when already written."""
    if (root / "test").is_dir():
        return root
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
