"""Every classification builder in torchvision.models, by the general rules plus two special cases."""

from __future__ import annotations

import difflib
from dataclasses import replace
from contextlib import contextmanager
from typing import Iterator
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision import models as tv_models

from thaw.errors import ThawError
from thaw.models import _structure, weights as weights_io
from thaw.models.adapter import Preprocessing, is_within
from thaw.models.generic import adapt_module

# SqueezeNet classifies with a 1x1 convolution, not a Linear.
SPECIAL_HEADS = {"SqueezeNet": "classifier.1"}
AUX_HEADS = ("AuxLogits", "aux1", "aux2")  # Inception v3's and GoogLeNet's


def list_torchvision_models() -> list[str]:
    return sorted(tv_models.list_models(module=tv_models))


def check_model_name(name: str) -> None:
    known = list_torchvision_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ThawError(f"unknown model {name!r}; {hint}run `thaw models` for the list (timm models: timm/NAME)")


def _existing_file(name: str, weights: str) -> bool:
    """A file or folder that is there, a file under another ending (Lightning's .ckpt, .PTH, none): a path, not an
    unknown weights name (a folder: one line from require_file). A weights name, or none, comes first: a file named
    DEFAULT or none in the current folder does not shadow it."""
    if weights.lower() == "none" or weights in tv_models.get_model_weights(name).__members__:
        return False
    return Path(weights).exists()


def weights_enum(name: str, weights: str) -> torchvision.models.WeightsEnum:
    enum = tv_models.get_model_weights(name)
    try:
        return enum[weights]
    except KeyError:
        valid = ", ".join(enum.__members__)
        raise ThawError(f"{name} has no weights {weights!r}; choose one of {valid}, a file path, or none") from None


def preprocessing_of(entry: torchvision.models.WeightsEnum, note: str = "") -> Preprocessing:
    """The preset torchvision attaches to the weights (resize, crop, mean, std, interpolation)."""
    preset = entry.transforms()
    return Preprocessing(
        mean=tuple(preset.mean),
        std=tuple(preset.std),
        resize_size=int(preset.resize_size[0]),
        crop_size=int(preset.crop_size[0]),
        interpolation=preset.interpolation.value,
        source=f"{entry}{note}",
    )


def drop_aux_heads(model: nn.Module) -> None:
    """GoogLeNet and Inception v3 carry ImageNet auxiliary heads that only help training from scratch."""
    if hasattr(model, "aux_logits"):
        model.aux_logits = False
        for attr in AUX_HEADS:
            if hasattr(model, attr):
                setattr(model, attr, None)


def head_of(model: nn.Module) -> str:
    """The module a new head replaces: SqueezeNet's 1x1 convolution, else the last Linear."""
    return SPECIAL_HEADS.get(type(model).__name__) or _structure.last_linear_name(model)


def adapt_torchvision(model: nn.Module, **options: object):
    drop_aux_heads(model)
    options.setdefault("head", head_of(model))
    options.setdefault("family", "torchvision")  # family= given to thaw.adapt was a TypeError (given twice)
    return adapt_module(model, **options)  # type: ignore[arg-type]


def build_torchvision(
    name: str,
    *,
    weights: str | None = None,
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
    load: bool = True,
    keep_head: bool = False,
):
    """Build `name` with `weights` (a torchvision weights name, a file path, or None) and adapt it.

    With load=False, or on the meta device, the architecture those weights
    imply is built without loading them: for plans, and for runs that bring their own weights.
    """
    check_model_name(name)
    default = tv_models.get_model_weights(name).DEFAULT
    is_path = weights is not None and (Path(weights).suffix in {".pth", ".pt", ".bin", ".safetensors"} or "/" in weights or _existing_file(name, weights))
    entry = weights_enum(name, weights) if weights and not is_path and weights.lower() != "none" else None
    on_meta = torch.device(device).type == "meta"
    load = load and not on_meta
    if entry is not None and load:
        weights_io.ensure_cached(entry.url)
    if on_meta:
        model = _build_on_meta(name, **_architecture_of(name, entry))
    elif not load:
        model = tv_models.get_model(name, weights=None, **_architecture_of(name, entry))
    else:
        model = tv_models.get_model(name, weights=entry)
    left_out = _load_file(model, str(weights)) if is_path and load else None
    note = "" if entry or is_path else " preprocessing (no weights loaded)"
    preprocessing = _fit_to_model(model, preprocessing_of(entry or default, note))
    if not on_meta:
        model.to(device)
    adapter = adapt_torchvision(model, num_classes=num_classes, preprocessing=preprocessing)
    if left_out is not None:
        weights_io.settle_head(adapter, str(weights), left_out, keep_head)
    return adapter


def _load_file(model: nn.Module, path: str) -> int | None:
    """The file's tensors, strictly, but for a head of another class count (a thaw run's): a new head replaces it
    anyway. The class count of a head left out, else None."""
    state = weights_io.load_state_dict_file(Path(path))
    if not any(is_within(key, aux) for key in state for aux in AUX_HEADS):  # saved by thaw, which drops them
        drop_aux_heads(model)
    return weights_io.load_into(model, state, path, head=head_of(model))


def _architecture_of(name: str, entry: torchvision.models.WeightsEnum | None) -> dict[str, object]:
    """What torchvision's builder would change for these weights, so a meta build has the same shape.

    ViT changes shape with its weights (SWAG weights run at 384-518 px); GoogLeNet
    and Inception v3 weights expect their own input transform.
    """
    if entry is None:
        return {}
    if name.startswith("vit_"):
        return {"image_size": entry.meta["min_size"][0]}
    if name in ("googlenet", "inception_v3"):
        return {"transform_input": True, "init_weights": False}
    return {}


def _fit_to_model(model: nn.Module, preprocessing: Preprocessing) -> Preprocessing:
    """A ViT built without weights takes 224 px even where its DEFAULT weights want 518."""
    size = getattr(model, "image_size", None)
    if not isinstance(size, int) or size == preprocessing.crop_size:
        return preprocessing
    resize = round(size * preprocessing.resize_size / preprocessing.crop_size)
    return replace(preprocessing, crop_size=size, resize_size=resize, source=preprocessing.source + f" at {size} px")


def _build_on_meta(name: str, **options: object) -> nn.Module:
    try:
        with torch.device("meta"):
            return tv_models.get_model(name, weights=None, **options)
    except NotImplementedError:
        # RegNet computes its widths with tensors while building; move parameters instead.
        with _parameters_on_meta():
            return tv_models.get_model(name, weights=None, **options)


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Each parameter and buffer moves to meta as it is registered (as accelerate's init_empty_weights)."""
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def on_meta_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register_parameter(module, name, param)

    def on_meta_buffer(module: nn.Module, name: str, tensor: torch.Tensor | None, persistent: bool = True) -> None:
        register_buffer(module, name, None if tensor is None else tensor.to("meta"), persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = on_meta_parameter, on_meta_buffer
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer
