"""Which device a model runs on: checked before anything is moved there (models are built on it, runs train on it).
Below every layer that builds or trains a model, so each of them can say in one line that a device is missing."""

from __future__ import annotations

import torch

from thaw.errors import ThawError


def device_problem(device: object) -> str | None:
    if device == "auto":
        return None
    if not isinstance(device, str):  # a torch.device trained the whole run, then could not be recorded in thaw.json
        return f"device must be a name like 'cpu' or 'cuda:0' (str(device) gives one), got {device!r}"
    try:
        torch.device(device)  # type: ignore[arg-type]
    except (RuntimeError, TypeError):
        return f"device must be auto, cpu, cuda, cuda:N or another torch device name, got {device!r}"
    return None


def check_device(device: str) -> None:
    """Refuse a device this machine does not have, before the model is moved there (torch's own
    error comes from deep inside the first `.to()`). Not part of TrainConfig's checks: a config
    may be written on one machine and run on another."""
    problem = device_problem(device)
    if problem:
        raise ThawError(problem)
    if device in ("auto", "cpu"):
        return
    kind = torch.device(device)
    if kind.type == "meta":
        raise ThawError("the meta device holds shapes, not numbers: it cannot train or run a model; use device 'cpu' or 'cuda' (--device cpu or cuda)")
    if kind.type == "cuda" and not torch.cuda.is_available():
        raise ThawError(f"device {device!r} (--device {device}): this machine has no CUDA device that torch can use; use 'cpu' or 'auto'")
    if kind.type == "cuda" and kind.index is not None and kind.index >= torch.cuda.device_count():
        raise ThawError(f"device {device!r} (--device {device}): this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0")
    if kind.type == "mps" and not torch.backends.mps.is_available():
        raise ThawError(f"device {device!r} (--device {device}): MPS (Apple GPUs) is not available here; use 'cpu' or 'auto'")


def resolve_device(device: str) -> torch.device:
    return torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
