"""Entering a network mid-way: the frozen bottom runs once per cached view, the top trains on its output.

A stage that trains only the top groups (gradual's stages, `train: ["-2:"]`) would run its
frozen bottom on every image of every epoch. Instead the input of the lowest trainable group
(the boundary) is cached like head features, and the stage trains from there.

Every family is entered the same way, through its own forward: one traced forward finds the
modules that finish before the boundary starts; while the top trains they hand their input
on unchanged, and the boundary's input is replaced by the cached tensor. A family whose
forward computes outside its modules before the boundary (ViT adds its class token and
position embedding there) is caught by a check on one batch against the whole network, and
its stage trains on the images as before. As for head features, the frozen part runs in
eval mode (dropout and stochastic depth off) and its BatchNorm layers must be eval-locked.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from thaw.models._structure import input_of
from thaw.models.adapter import ModelAdapter, is_within
from thaw.plan.freeze import is_eval_locked, keeps_batch_statistics
from thaw.train.loop import Engine

# Caching a tensor larger than the image it replaces (an early boundary: 32 x 112 x 112 values
# against 3 x 224 x 224) costs more memory than decoding did and saves only the first layers.
MAX_SIZE_PER_IMAGE = 1.0
# Logits of the network entered mid-way against the whole network on the same batch, relative to the
# largest logit: the same operations on the same tensors, so they agree to rounding (bf16 kernels may block differently).
AGREEMENT_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@dataclass(frozen=True)
class Entry:
    """Where a stage enters the network: the module whose input is cached, and the modules that run before it."""

    boundary: str
    skipped: tuple[str, ...]  # the outermost modules that finish before the boundary starts
    tail: tuple[str, ...]  # the outermost modules that start with or after it: they run on the cached tensor


def lowest_trainable_group(adapter: ModelAdapter, trainable: tuple[str, ...]) -> int:
    chosen = set(trainable)
    return min(index for index, group in enumerate(adapter.groups) if chosen & set(group.params))


def _trace(model: nn.Module, images: torch.Tensor, engine: Engine) -> list[tuple[str, str]]:
    """Every module's start and end, in the order one eval forward reaches them."""
    events: list[tuple[str, str]] = []
    handles = []
    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(lambda *_, n=name: events.append(("start", n))))
            handles.append(module.register_forward_hook(lambda *_, n=name: events.append(("end", n))))
    try:
        with torch.no_grad(), engine.autocast():
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    return events


def find_entry(adapter: ModelAdapter, trainable: tuple[str, ...], images: torch.Tensor, engine: Engine) -> Entry | str:
    """Where this stage can enter the network, or why it cannot (then it trains on the images)."""
    model = adapter.model
    lowest = lowest_trainable_group(adapter, trainable)
    if lowest == 0:
        return "the lowest layer group trains"
    with _mode(model, training=False):
        events = _trace(model, images, engine)
    roots = adapter.groups[lowest].modules
    starts = [index for index, (kind, name) in enumerate(events) if kind == "start" and name in roots]
    if not starts:
        return f"the forward pass never reached {roots[0]}"
    begin = starts[0]
    boundary = events[begin][1]
    ended = {name for kind, name in events[:begin] if kind == "end"}
    again = {name for _, name in events[begin:]}  # called after the boundary starts (or still running): not skippable
    done = ended - again
    skipped = _outermost(done)
    if not skipped:
        return f"no layer runs before {boundary}"
    tail = _outermost({name for kind, name in events[begin:] if kind == "start"} - {name for kind, name in events[:begin] if kind == "start"})
    return check_skipped(model, trainable, Entry(boundary, skipped, tail))


def _outermost(names: set[str]) -> tuple[str, ...]:
    return tuple(sorted(name for name in names if not any(is_within(name, other) for other in names if other != name)))


def in_tail(name: str, entry: Entry) -> bool:
    return any(is_within(name, root) for root in entry.tail)


def check_skipped(model: nn.Module, trainable: tuple[str, ...], entry: Entry) -> Entry | str:
    """The entry, where everything the stage trains lies in layers that run from the boundary on (a parameter
    used below it would lose that part of its gradient) and every BatchNorm outside them is eval-locked."""
    for name in trainable:
        if not in_tail(name, entry):
            return f"{name} trains but is used before {entry.boundary}"
    for name, layer in model.named_modules():
        if keeps_batch_statistics(layer) and not in_tail(name, entry) and not is_eval_locked(layer):
            return f"BatchNorm {name} below {entry.boundary} updates its statistics (policy train)"
    return entry


def draws_at_random(model: nn.Module, entry: Entry, head: nn.Module, images: torch.Tensor | None, engine: Engine) -> bool:
    """Whether the layers between the boundary and `head`, in train mode, hand the head different tensors on two
    runs (dropout, stochastic depth, in a layer or in the forward). True where it cannot be checked."""
    if images is None:
        return True
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(images.device) if images.device.type == "cuda" else None
    try:
        with torch.no_grad(), engine.autocast():
            with _mode(model, training=False):
                features = capture(model, entry)(images)
            seen = []
            with _mode(model, training=True):  # frozen BatchNorm layers stay in eval: their hooks win
                for seed in (1, 2):
                    torch.manual_seed(seed)
                    with _entered(model, entry, features):
                        inputs = input_of(model, head, features)
                    seen.append(None if inputs is None else inputs[0][0])
    finally:
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, images.device)
    return seen[0] is None or seen[1] is None or not torch.equal(seen[0], seen[1])


def capture(model: nn.Module, entry: Entry) -> Callable[[torch.Tensor], torch.Tensor]:
    """The forward pass up to the boundary: what the cache stores for each image (empty where the boundary
    does not take one tensor: nothing a cache could hold)."""
    boundary = model.get_submodule(entry.boundary)

    def forward_prefix(images: torch.Tensor) -> torch.Tensor:
        inputs = input_of(model, boundary, images)
        if inputs is None:
            raise RuntimeError(f"the forward pass never reached {entry.boundary}")
        args, kwargs = inputs
        return args[0] if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor) else torch.empty(0)

    return forward_prefix


@contextmanager
def _mode(model: nn.Module, training: bool) -> Iterator[None]:
    """`model` in train or eval mode while inside, then back in the mode it was in."""
    was_training = model.training
    model.train(training)
    try:
        yield
    finally:
        model.train(was_training)


def _hand_on(first: torch.Tensor, *_args: object, **_kwargs: object) -> torch.Tensor:
    return first


@contextmanager
def _entered(model: nn.Module, entry: Entry, features: torch.Tensor) -> Iterator[None]:
    """While inside: the skipped modules hand their input on, and the boundary receives `features`."""
    skipped = [model.get_submodule(name) for name in entry.skipped]
    own = [module.__dict__.get("forward") for module in skipped]  # a forward set on the instance (a wrapper's) comes back after
    handle = model.get_submodule(entry.boundary).register_forward_pre_hook(lambda _m, args: (features, *args[1:]))
    for module in skipped:
        module.forward = _hand_on  # an instance attribute: parameters, buffers and state_dict stay as they are
    try:
        yield
    finally:
        handle.remove()
        for module, forward in zip(skipped, own):
            if forward is None:
                del module.forward
            else:
                module.forward = forward


def tail_forward(model: nn.Module, entry: Entry) -> Callable[[torch.Tensor], torch.Tensor]:
    """The network from the boundary on, fed cached boundary inputs. `model` may be a copy (the weight average)."""

    def forward_tail(features: torch.Tensor) -> torch.Tensor:
        with _entered(model, entry, features):
            return model(features)

    return forward_tail


def disagreement(model: nn.Module, entry: Entry, images: torch.Tensor, engine: Engine) -> str | None:
    """None when the network entered at the boundary gives the whole network's logits on `images` (eval mode)."""
    try:
        with torch.no_grad(), engine.autocast(), _mode(model, training=False):
            whole = model(images).float()
            features = capture(model, entry)(images)
            if not features.numel():
                return f"{entry.boundary} takes more than one tensor"
            if features.numel() > MAX_SIZE_PER_IMAGE * images.numel():
                return f"the input of {entry.boundary} ({features[0].numel():,} values per image) is larger than the image"
            entered = tail_forward(model, entry)(features).float()
    except Exception as error:  # noqa: BLE001 - a family whose forward cannot be entered this way trains as before
        return f"the network cannot be entered at {entry.boundary} ({type(error).__name__})"
    if not _agrees(entered, whole, engine):
        return f"entered at {entry.boundary}, the network does not give its own logits (its forward computes outside its layers)"
    return None


def head_split_disagreement(adapter: ModelAdapter, images: torch.Tensor, engine: Engine) -> str | None:
    """None when the head run on the features a head stage caches gives the whole network's logits on `images` (eval
    mode; noise serves). A forward that computes after its head (logits divided by a temperature, a class prior added) trained the
    cached head on another function than the model's, and recorded a val loss the delivered model never had."""
    try:
        with torch.no_grad(), engine.autocast(), _mode(adapter.model, training=False):
            whole = adapter.model(images).float()
            split = adapter.forward_head(adapter.forward_features(images)).float()
    except Exception as error:  # noqa: BLE001 - a head that cannot run on its own trains on the images, as before the cache
        return f"the head cannot run on the features alone ({type(error).__name__})"
    if not _agrees(split, whole, engine):
        return "the head on the frozen features does not give the model's own logits (its forward computes after the head)"
    return None


def _agrees(part: torch.Tensor, whole: torch.Tensor, engine: Engine) -> bool:
    """Whether logits computed in parts are the whole network's, to the engine's precision."""
    scale = whole.abs().max().item() + 1.0  # + 1: logits near zero
    tolerance = AGREEMENT_TOLERANCE[torch.bfloat16 if engine.bf16 else torch.float32]
    return part.shape == whole.shape and bool(torch.isfinite(part).all()) and (part - whole).abs().max().item() <= tolerance * scale
