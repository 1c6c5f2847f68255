"""Model adapters: build or wrap a pretrained model and answer thaw's contract about it."""

from __future__ import annotations

import os

import torch

from thaw._device import check_device, resolve_device
from thaw.errors import ThawError

from thaw.models.adapter import LayerGroup, ModelAdapter, Preprocessing
from thaw.models.generic import adapt
from thaw.models.timm_models import build_timm
from thaw.models.torchvision_models import build_torchvision, list_torchvision_models

TIMM_PREFIX = "timm/"

__all__ = [
    "LayerGroup",
    "ModelAdapter",
    "Preprocessing",
    "adapt",
    "build_model",
    "list_torchvision_models",
]


def _checked_device(device: object) -> str | torch.device:
    """One line for a device this machine lacks (not torch's driver error from the first .to()); 'auto' as training
    resolves it; a CUDA index (0) as torch reads it. The meta device builds shapes only (thaw's own probes)."""
    if isinstance(device, int) and not isinstance(device, bool):
        device = torch.device(device)
    if str(device).split(":")[0] == "meta":
        return device  # type: ignore[return-value]
    check_device(str(device))
    return resolve_device(str(device))


def build_model(
    name: str,
    *,
    weights: str | None = None,
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
    load: bool = True,
    keep_head: bool = False,
) -> ModelAdapter:
    """A torchvision model by name, or a timm one as ``timm/NAME``, adapted to `num_classes`.

    load=False builds the architecture `weights` imply without loading them. `keep_head`: where `weights` is a file
    whose head has `num_classes` outputs (a thaw run's model.safetensors, for the same classes in the same order: the
    caller's to check), that head is kept instead of a new one.
    """
    if not isinstance(name, str):  # a model object goes to adapt(), or straight to train_images
        raise ThawError(
            f"build_model takes a model name like 'mobilenet_v2' or 'timm/NAME', got a {type(name).__name__}; "
            "for a model you built, use thaw.adapt(model)"
        )
    if weights is not None and not isinstance(weights, (str, os.PathLike)):  # a number was a TypeError from pathlib
        raise ThawError(f"weights must be a weights name like 'IMAGENET1K_V1', a file's path, or None, got {weights!r}")
    device = _checked_device(device)
    if isinstance(weights, str) and not weights.strip():  # an unset variable: read as no weights, it trained from scratch
        raise ThawError("weights is an empty string; give a weights name (DEFAULT, IMAGENET1K_V1), a file path, or None for random weights")
    options = {"weights": weights, "num_classes": num_classes, "device": device, "load": load, "keep_head": keep_head}
    if name.startswith(TIMM_PREFIX):
        return build_timm(name[len(TIMM_PREFIX) :], **options)
    return build_torchvision(name, **options)
