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
    """Use a private torch hub cache so results never depend on what a machine cached before."""
    os.environ.setdefault("TORCH_HOME", str(scratch("torch-home")))
