"""Checkpoints written atomically (temp file, fsync, rename) and read without running code."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from thaw._io import atomic_write
from thaw.errors import ThawError, first_line

CHECKPOINT = "checkpoint.pt"
CLASSES_KEY = "thaw.classes"  # in a run's model.safetensors header: its class names, as JSON, in head order


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda target: torch.save(state, target))


def save_weights(path: Path, model: torch.nn.Module, classes: Sequence[str] | None = None) -> None:
    """The model's tensors as safetensors; a run's `classes`, in head order, go into the file's header, so that a
    thaw.json edited by hand or weights copied in from another run are found where the run is loaded."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    header = None if classes is None else {CLASSES_KEY: json.dumps(list(classes))}
    atomic_write(path, lambda target: save_file(tensors, str(target), metadata=header))


def load_checkpoint(path: Path, remedy: str = "start a new run") -> dict[str, Any]:
    """The checkpoint at `path`, or one line saying it is missing or damaged and what to do (`remedy`)."""
    if not path.is_file():
        raise ThawError(f"no checkpoint at {path}; a resume (resume=True, --resume) needs a run folder that thaw train wrote")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # damaged files raise several types
        raise ThawError(f"cannot read checkpoint {path} ({first_line(error)}); {remedy}") from None
