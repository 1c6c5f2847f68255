"""timm models through timm's own contract: get_classifier, reset_classifier, group_matcher, pretrained_cfg."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from thaw.errors import ThawError, first_line
from thaw.models import weights as weights_io
from thaw.models._structure import is_norm
from thaw.models.adapter import LayerGroup, ModelAdapter, Preprocessing, is_within


def _import_timm():
    try:
        import timm
    except ImportError:
        raise ThawError("timm is not installed; install it with `pip install timm`") from None
    return timm


def _module_name(model: nn.Module, module: nn.Module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise ThawError(f"{type(model).__name__}.get_classifier() returned a module that is not part of the model")


def _shared_module(params: list[str]) -> str:
    parts = [p.split(".")[:-1] for p in params]
    shared = parts[0]
    for other in parts[1:]:
        while other[: len(shared)] != shared:
            shared = shared[:-1]
    return ".".join(shared)


def _group_name(index: int, params: list[str], norm_params: set[str]) -> str:
    """Name a timm group by the module its parameters share; timm folds a trailing norm into the last block."""
    shared = _shared_module(params)
    if shared or index == 0:
        return shared or "stem"
    return _shared_module([p for p in params if p not in norm_params] or params) or f"group{index}"


def timm_groups(model: nn.Module, head_name: str) -> list[LayerGroup]:
    from timm.models import group_parameters

    head_params = tuple(n for n, _ in model.named_parameters() if is_within(n, head_name))
    ordered = group_parameters(model, model.group_matcher(coarse=True))
    norm_params = {
        f"{module_name}.{p}" for module_name, module in model.named_modules() if is_norm(module)
        for p, _ in module.named_parameters()
    }
    groups, seen = [], set()
    for _, names in sorted(ordered.items()):
        body = [n for n in names if n not in head_params]
        if body:
            name = _group_name(len(groups), body, norm_params)
            name = name if name not in seen and name != "head" else f"{name}#{len(groups)}"
            seen.add(name)
            modules = tuple(dict.fromkeys(n.rsplit(".", 1)[0] for n in body))
            groups.append(LayerGroup(name, modules, tuple(body)))
    groups.append(LayerGroup("head", (head_name,), head_params))
    return groups


def timm_preprocessing(model: nn.Module) -> Preprocessing:
    from timm.data import resolve_data_config

    config = resolve_data_config({}, model=model)
    crop = int(config["input_size"][-1])
    return Preprocessing(
        mean=tuple(config["mean"]),
        std=tuple(config["std"]),
        resize_size=int(round(crop / config.get("crop_pct", 0.875))),
        crop_size=crop,
        interpolation=str(config.get("interpolation", "bicubic")),
        source="timm pretrained_cfg",
    )


def adapt_timm(model: nn.Module, *, num_classes: int | None = None) -> ModelAdapter:
    if num_classes is not None:
        if num_classes < 1:
            raise ThawError(f"num_classes must be at least 1, got {num_classes}")
        model.reset_classifier(num_classes)
    classifier = model.get_classifier()
    if not isinstance(classifier, (nn.Linear, nn.Conv2d)) or classifier is None:
        raise ThawError(f"{type(model).__name__} has no Linear classifier; build it with num_classes >= 1")
    head_name = _module_name(model, classifier)
    return ModelAdapter(
        model,
        family="timm",
        head_name=head_name,
        groups=timm_groups(model, head_name),
        preprocessing=timm_preprocessing(model),
        features_fn=model.forward_features,
        head_fn=model.forward_head,
    )


def build_timm(
    name: str,
    *,
    weights: str | None = None,
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
    load: bool = True,
    keep_head: bool = False,
) -> ModelAdapter:
    """`weights`: None for random init, "DEFAULT" for timm's pretrained download, or a file path."""
    timm = _import_timm()
    if name not in timm.list_models():
        raise ThawError(f"unknown timm model {name!r}; see timm.list_models() for names")
    on_meta = torch.device(device).type == "meta"
    load = load and not on_meta
    options: dict[str, object] = {}
    from_file = bool(weights) and weights.lower() not in ("none", "default") and load
    if from_file:  # timm's own reader (tensors only) and the model's checkpoint filter, as for its downloads
        weights_io.require_file(Path(weights))  # before timm, which would log its own line too
        options = {"pretrained": True, "pretrained_cfg_overlay": {"file": weights}}
    elif weights and weights.lower() == "default" and load:
        options = {"pretrained": True}
    left_out = None
    try:
        with torch.device("meta") if on_meta else nullcontext():
            model = timm.create_model(name, **options)
    except Exception as error:  # noqa: BLE001 - timm's filters raise KeyError and others for a file that does not fit
        said = first_line(error)
        if not from_file:
            if not isinstance(error, (OSError, RuntimeError)):
                raise
            raise ThawError(f"could not load timm weights for {name} ({said}); offline, pass a local file (weights=PATH, --weights PATH)") from None
        model = timm.create_model(name)
        left_out = _load_without_head(model, Path(weights), said)
        if left_out is None:
            raise ThawError(f"timm could not load {weights} into {name} ({said})") from None
    adapter = adapt_timm(model.to(device) if not on_meta else model, num_classes=num_classes)
    if left_out is not None:
        weights_io.settle_head(adapter, str(weights), left_out, keep_head)
    return adapter


def _load_without_head(model: nn.Module, path: Path, timm_said: str) -> int | None:
    """A file timm failed on, read by thaw's own reader: where its head alone has another class count (a thaw run's
    weights, which timm loads strictly into its stock head), the body loads and that count is returned. Otherwise
    one line on what does not fit the model (or that only the names differ); where the reader refuses the file too,
    its reason with timm's. None where the whole file fits, and timm failed on something else."""
    try:
        state = weights_io.load_state_dict_file(path)
    except ThawError as refused:
        raise ThawError(f"{refused} (timm: {timm_said})") from None
    classifier = model.get_classifier()  # a distilled model's is a pair: then no head is left out
    head = _module_name(model, classifier) if isinstance(classifier, nn.Module) else None
    return weights_io.load_into(model, state, str(path), head=head)
