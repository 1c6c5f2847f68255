"""Freezing: which parameters train, and what frozen BatchNorm layers do.

BatchNorm policy for frozen layers:
  frozen  eval mode with fixed running statistics, kept through any later
          model.train() call (a forward pre-hook re-asserts eval mode);
  train   fastai's train_bn: affine parameters trainable, statistics update.
  eval    every BatchNorm layer, trainable or not, in eval mode with fixed
          statistics (affine parameters of trainable layers still train):
          Keras's advice for fine-tuning, so unfreezing does not swap the
          statistics the head was trained on for batch statistics.
  adapt   AdaBN: at the stage's start thaw's loop re-estimates every BatchNorm
          layer's running statistics on the training images (one pass in
          train mode, eval view, no gradients; thaw.train.adapt_bn), then
          holds them fixed as `eval` does. The one policy that changes the
          statistics of frozen layers, once, on purpose.
Nothing else about a BatchNorm layer (momentum, track_running_stats) is touched. An InstanceNorm that tracks
running statistics is one here too: train mode updates them as it does a BatchNorm's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from typing import Iterator, Literal

from torch import nn

from thaw.errors import ThawError
from thaw.models.adapter import ModelAdapter, check_adapter
from thaw.plan.selectors import group_of_module

BatchNormPolicy = Literal["frozen", "train", "eval", "adapt"]
BATCHNORM_POLICIES: tuple[str, ...] = ("frozen", "train", "eval", "adapt")
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


def keeps_batch_statistics(module: nn.Module) -> bool:
    """BatchNorm, and InstanceNorm where it tracks running statistics: the norms whose statistics train mode updates
    (an InstanceNorm in a frozen layer changed in a head-only stage). Each policy treats both alike."""
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        return module.track_running_stats
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def release(model: nn.Module, requires_grad: Mapping[int, bool]) -> None:
    """Give a model back as plain PyTorch: no eval lock on any BatchNorm (each layer in the model's mode), and each
    parameter's requires_grad as `requires_grad` (by id: LoRA renames the layers it wraps) says, True for one it does
    not hold (an adapter). A model object passed to a run kept the locks after it, and BatchNorm stayed in eval mode
    in the user's own loop."""
    for module in model.modules():
        if is_eval_locked(module):
            _unlock(module, model.training)
    for param in model.parameters():
        param.requires_grad_(requires_grad.get(id(param), True))


def batch_norms(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """BatchNorm layers alone: those that need 2 images or more a batch in train mode, and those AdaBN estimates (an
    InstanceNorm normalises each image by itself, and takes a momentum of None as 0: its statistics would stay reset)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._NormBase]]:
    return [(n, m) for n, m in model.named_modules() if keeps_batch_statistics(m)]


def is_eval_locked(module: nn.Module) -> bool:
    return getattr(module, _HOOK_ATTR, None) is not None


def needs_two_images(model: nn.Module) -> bool:
    """Whether some BatchNorm layer normalises with the batch's own statistics (not eval-locked), which a batch of one
    image has not (torch raises). InstanceNorm normalises each image by itself: it never counts."""
    return any(not is_eval_locked(layer) for _, layer in batch_norms(model))


def trainable_names(adapter: ModelAdapter, selected: list[str], batchnorm: BatchNormPolicy) -> list[str]:
    """What trains in a stage: the selected parameters, plus every BatchNorm's affine ones under `train`."""
    chosen = set(selected)
    if batchnorm == "train":
        for name, layer in batchnorm_layers(adapter.model):
            chosen.update(f"{name}.{p}" for p, _ in layer.named_parameters())
    return [name for name, _ in adapter.model.named_parameters() if name in chosen]


def batchnorm_trains(adapter: ModelAdapter, name: str, layer: nn.Module, trainable: set[str]) -> bool:
    """Whether a BatchNorm layer trains in a stage: when its own parameters do (affine-free layers:
    when their group does; outside every group: only where every group trains). apply_trainable
    acts on this rule and resolve_stage reports it, so the two cannot disagree."""
    own = [f"{name}.{p}" for p, _ in layer.named_parameters()]
    if own:
        return any(p in trainable for p in own)
    try:
        group = adapter.group(group_of_module(adapter, name))
    except ThawError:  # an affine-free layer no group holds (a model's own `self.norm`): no group says it trains, and
        # updating its statistics in a head-only stage changed the frozen model (plain PyTorch's train mode did so)
        return all(p in trainable for each in adapter.groups for p in each.params)
    return any(p in trainable for p in group.params)


def locks_statistics(policy: BatchNormPolicy, trains: bool) -> bool:
    """Whether a BatchNorm layer is held in eval mode with fixed statistics under `policy`."""
    return policy in ("eval", "adapt") or (policy == "frozen" and not trains)


def apply_trainable(adapter: ModelAdapter, selected: list[str], batchnorm: BatchNormPolicy = "frozen") -> list[str]:
    """Set requires_grad for exactly what trains (`selected`: parameter names) and apply the BatchNorm policy; returns
    what trains."""
    if batchnorm not in BATCHNORM_POLICIES:
        raise ThawError(f"batchnorm policy must be one of {', '.join(BATCHNORM_POLICIES)}, got {batchnorm!r}")
    check_adapter(adapter, "apply_trainable")
    if isinstance(selected, str):
        selected = [selected]
    if isinstance(selected, Iterable) and not isinstance(selected, Mapping):  # dict keys, a generator: read once, here
        selected = list(selected)
    if not isinstance(selected, list) or not all(isinstance(name, str) for name in selected):
        raise ThawError(f"apply_trainable takes a list of parameter names, like ['fc.weight', 'fc.bias'], got {selected!r}")
    names = {name for name, _ in adapter.model.named_parameters()}
    unknown = [name for name in selected if name not in names]
    if unknown:  # a typo would otherwise freeze everything and train nothing, silently
        raise ThawError(
            f"apply_trainable takes parameter names, and {', '.join(map(repr, unknown[:3]))} "
            f"{'is not one' if len(unknown) == 1 else 'are not'} of this model's; for selectors (groups such as 'head', "
            "module names, slices) pass resolve(adapter, selectors) or use apply_stage"
        )
    chosen = set(trainable_names(adapter, selected, batchnorm))
    for name, param in adapter.model.named_parameters():
        param.requires_grad_(name in chosen)
    training = adapter.model.training
    for name, layer in batchnorm_layers(adapter.model):
        if locks_statistics(batchnorm, batchnorm_trains(adapter, name, layer, chosen)):
            _lock_eval(layer)
        else:
            _unlock(layer, training)
    return [name for name, _ in adapter.model.named_parameters() if name in chosen]


@contextmanager
def estimating_statistics(model: nn.Module) -> Iterator[list[nn.modules.batchnorm._BatchNorm]]:
    """For AdaBN: the model in eval mode (dropout off) but every BatchNorm layer that tracks statistics in train
    mode, its statistics reset and averaged over every batch that follows (momentum None); afterwards each layer's
    momentum, mode and eval lock as they were. Yields the layers."""
    layers = [layer for _, layer in batch_norms(model) if layer.track_running_stats]
    modes = {module: module.training for module in model.modules()}
    kept = [(layer.momentum, is_eval_locked(layer)) for layer in layers]
    model.eval()
    for layer in layers:
        _unlock(layer, True)
        layer.reset_running_stats()
        layer.momentum = None  # a cumulative average: every batch counts the same
    try:
        yield layers
    finally:
        for layer, (momentum, locked) in zip(layers, kept):
            layer.momentum = momentum
        for module, training in modes.items():
            module.train(training)
        for layer, (_, locked) in zip(layers, kept):
            if locked:
                _lock_eval(layer)
