"""Freezing: which parameters train, and what frozen BatchNorm layers do.

BatchNorm policy for frozen layers:
  frozen  eval mode with fixed running statistics, kept through any later
          model.train() call (a forward pre-hook re-asserts eval mode);
  train   fastai's train_bn: affine parameters trainable, statistics update.
  eval    every BatchNorm layer, trainable or not, in eval mode with fixed
          statistics (affine parameters of trainable layers still train):
          Keras's advice for fine-tuning, so unfreezing does not swap the
          statistics the head was trained on for batch statistics.
Nothing else about a BatchNorm layer (momentum, track_running_stats) is touched.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from thaw.errors import ThawError
from thaw.models.adapter import ModelAdapter

BatchNormPolicy = Literal["frozen", "train", "eval"]
BATCHNORM_POLICIES: tuple[str, ...] = ("frozen", "train", "eval")
_HOOK_ATTR = "_thaw_frozen_bn_hook"


def _keep_in_eval(module: nn.Module, _args: tuple) -> None:
    # model.train() flips .training back on; this runs before every forward and wins.
    module.training = False


def _lock_eval(module: nn.Module) -> None:
    module.eval()
    if getattr(module, _HOOK_ATTR, None) is None:
        setattr(module, _HOOK_ATTR, module.register_forward_pre_hook(_keep_in_eval))


def _unlock(module: nn.Module, training: bool) -> None:
    handle = getattr(module, _HOOK_ATTR, None)
    if handle is not None:
        handle.remove()
        setattr(module, _HOOK_ATTR, None)
    module.train(training)


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def is_eval_locked(module: nn.Module) -> bool:
    return getattr(module, _HOOK_ATTR, None) is not None


def trainable_names(adapter: ModelAdapter, selected: list[str], batchnorm: BatchNormPolicy) -> list[str]:
    """What trains in a stage: the selected parameters, plus every BatchNorm's affine ones under `train`."""
    chosen = set(selected)
    if batchnorm == "train":
        for name, layer in batchnorm_layers(adapter.model):
            chosen.update(f"{name}.{p}" for p, _ in layer.named_parameters())
    return [name for name, _ in adapter.model.named_parameters() if name in chosen]


def apply_trainable(adapter: ModelAdapter, selected: list[str], batchnorm: BatchNormPolicy = "frozen") -> list[str]:
    """Set requires_grad for exactly what trains and apply the BatchNorm policy; returns what trains.

    A BatchNorm layer counts as frozen when none of its parameters trains
    (for affine-free layers: when its group does not train).
    """
    if batchnorm not in BATCHNORM_POLICIES:
        raise ThawError(f"batchnorm policy must be one of {', '.join(BATCHNORM_POLICIES)}, got {batchnorm!r}")
    chosen = set(trainable_names(adapter, selected, batchnorm))
    bn_layers = batchnorm_layers(adapter.model)
    for name, param in adapter.model.named_parameters():
        param.requires_grad_(name in chosen)
    training = adapter.model.training
    for name, layer in bn_layers:
        if batchnorm == "eval" or (batchnorm == "frozen" and _layer_is_frozen(adapter, name, layer, chosen)):
            _lock_eval(layer)
        else:
            _unlock(layer, training)
    return [name for name, _ in adapter.model.named_parameters() if name in chosen]


def _layer_is_frozen(adapter: ModelAdapter, name: str, layer: nn.Module, chosen: set[str]) -> bool:
    own = [f"{name}.{p}" for p, _ in layer.named_parameters()]
    if own:
        return not any(p in chosen for p in own)
    from thaw.plan.selectors import group_of_module

    try:
        group = adapter.group(group_of_module(adapter, name))
    except ThawError:  # a parameter-free layer outside every group behaves as plain PyTorch
        return False
    return not any(p in chosen for p in group.params)
