"""Shared set-up for the benchmark scripts."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
HYMENOPTERA = SHARED_DATA / "hymenoptera_data"


def scratch(name: str) -> Path:
    """A fresh folder for run outputs, outside the repository."""
    return Path(tempfile.mkdtemp(prefix=f"thaw-bench-{name}-"))


def offline_torch_home() -> None:
    """A private torch hub cache holding the offline MobileNetV2 file, so every row loads the same weights."""
    os.environ.setdefault("TORCH_HOME", str(scratch("torch-home")))
    from torchvision.models import MobileNet_V2_Weights

    from thaw.models.weights import ensure_cached

    ensure_cached(MobileNet_V2_Weights.IMAGENET1K_V1.url)
