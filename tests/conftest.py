from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HYMENOPTERA = SHARED_DATA / "hymenoptera_data"

torch.set_num_threads(2)


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub cache, so tests never depend on (or write to) the user's cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home"


class SmallConvNet(nn.Module):
    """A small BatchNorm convnet like the ones users write by hand."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block1 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Linear(16, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.block2(self.block1(self.stem(x)))))


@pytest.fixture
def small_net() -> SmallConvNet:
    torch.manual_seed(0)
    return SmallConvNet()


def write_class_images(root: Path, classes: tuple[str, ...] = ("red", "green", "blue"), per_class: int = 12, size: int = 24, seed: int = 0) -> Path:
    """Small PNGs whose class is their dominant colour, with noise: learnable in a few steps."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for index, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for item in range(per_class):
            pixels = rng.integers(0, 90, size=(size, size, 3))
            pixels[..., index % 3] += 150
            Image.fromarray(pixels.clip(0, 255).astype("uint8")).save(folder / f"{item:03d}.png")
    return root


@pytest.fixture
def tiny_split_data(tmp_path: Path) -> Path:
    """train/ and val/ folders of three colour classes."""
    root = tmp_path / "colours"
    write_class_images(root / "train", per_class=12, seed=0)
    write_class_images(root / "val", per_class=6, seed=1)
    return root


class RunsCode:
    """Unpickling this runs a shell command: what a malicious weights file does."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))
