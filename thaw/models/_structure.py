"""General rules that find a model's head and layer groups from its structure.

These rules hold for every torchvision classifier and for most hand-written
models; users override them by naming modules (``head="classifier.1"``,
explicit groups) when they do not.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from thaw.errors import ThawError, first_line
from thaw.models.adapter import LayerGroup, is_within

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LocalResponseNorm,
)
HEAD_TYPES = (nn.Linear, nn.Conv2d)
# A container holding more than this share of the parameters is a trunk
# (ViT's encoder.layers, RegNet's trunk_output): split it into its blocks.
TRUNK_SHARE = 0.9
# Fewer groups than this cannot express discriminative learning rates.
MIN_GROUPS = 4
RESERVED_GROUP_NAMES = ("head", "all", "adapters")  # selectors of their own (thaw.plan.selectors)


def has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, NORM_TYPES)


def last_linear_name(model: nn.Module) -> str:
    """The last nn.Linear in registration order: the head of almost every classifier."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise ThawError(
            f"no nn.Linear found in {type(model).__name__} to use as the head; "
            "name it explicitly, e.g. adapt(model, head='classifier.1') or --head classifier.1"
        )
    return names[-1]


PROBE_SIZES = (224, 32, 28, 64, 96, 128, 160, 256, 299, 384)  # image sizes a hand-written model may be built for


def forward_order(model: nn.Module, size: int | None = None) -> list[str] | None:
    """The names of `model`'s modules in the order its forward pass first calls them, on a batch of images: `size` px
    if given, else the first of PROBE_SIZES the model takes; RGB, else the channels some convolution takes (grayscale,
    say). The forward runs on a copy of the model on the meta device (shapes only: no memory, no compute), in training
    mode as thaw trains it; the model itself, its state and its modes are not touched. None where no such forward runs
    (a model that takes tokens) or no copy can be made (TorchScript inside)."""
    probe = meta_copy(model)
    if probe is None:
        return None
    probe.train()  # as thaw trains it
    names = {id(module): name for name, module in reversed(list(probe.named_modules()))}  # a shared module: its first name
    convolutions = [module.in_channels for module in probe.modules() if isinstance(module, nn.Conv2d)]
    shapes = [(channels, side) for channels in dict.fromkeys([3, *convolutions]) for side in ([size] if size else PROBE_SIZES)]
    order: list[str] = []
    handles = []
    try:
        for module in probe.modules():
            handles.append(module.register_forward_pre_hook(lambda module, _inputs: order.append(names[id(module)])))
        for channels, side in shapes:
            order.clear()
            if meta_forward_failure(probe, torch.empty(2, channels, side, side, device="meta")) is None:
                return list(dict.fromkeys(order))
    except Exception:  # noqa: BLE001 - a module that takes no hooks: the registration order stands
        return None
    finally:
        for handle in handles:
            handle.remove()
    return None


def meta_copy(model: nn.Module) -> nn.Module | None:
    """A copy of `model` whose parameters and buffers are on the meta device, nothing copied from their storage: a
    forward on it computes shapes only, and leaves the model itself (its state, its modes, its hooks) as it was."""
    memo: dict[int, object] = {}
    for param in model.parameters():
        memo[id(param)] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
    for buffer in model.buffers():
        memo[id(buffer)] = torch.empty_like(buffer, device="meta")
    try:
        return copy.deepcopy(model, memo)
    except Exception:  # noqa: BLE001 - TorchScript modules and other objects that do not copy
        return None


def meta_forward_failure(probe: nn.Module, images: torch.Tensor, limit: int = 160) -> str | None:
    """Why a forward of `probe` (a meta_copy) on the meta-device `images` fails, or None where it runs."""
    try:
        with torch.no_grad():
            probe(images)
    except Exception as error:  # noqa: BLE001 - any failure means only that the model does not take such a batch
        return first_line(error, limit)
    return None


def output_linear_name(model: nn.Module, order: list[str] | None) -> str:
    """The head of a hand-written model: the last nn.Linear its forward calls (where the forward runs on images),
    else the last one it registers. Registration order is the order of __init__, which need not be the forward's."""
    linears = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    called = [name for name in order or [] if name in linears]
    return called[-1] if called else last_linear_name(model)


def check_head(model: nn.Module, head_name: str) -> nn.Module:
    try:
        head = model.get_submodule(head_name)
    except AttributeError:
        modules = [name for name, module in model.named_modules() if isinstance(module, HEAD_TYPES)]
        raise ThawError(
            f"head {head_name!r} is not a module of {type(model).__name__}; "
            f"Linear/Conv2d modules are: {', '.join(modules[-6:]) or 'none'}"
        ) from None
    if not isinstance(head, HEAD_TYPES):
        raise ThawError(f"head {head_name!r} is a {type(head).__name__}; it must be an nn.Linear or a 1x1 nn.Conv2d")
    return head


def replace_head(model: nn.Module, head_name: str, num_classes: int) -> nn.Module:
    """Swap the head for a fresh N-class layer in place, so dropout and pooling around it stay."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ThawError(f"num_classes must be a whole number of at least 2 (a classifier tells classes apart), got {num_classes!r}")
    old = check_head(model, head_name)
    like = {"device": old.weight.device, "dtype": old.weight.dtype, "bias": old.bias is not None}
    if isinstance(old, nn.Linear):
        new: nn.Module = nn.Linear(old.in_features, num_classes, **like)
    else:
        new = nn.Conv2d(old.in_channels, num_classes, kernel_size=old.kernel_size, **like)
    parent_name, _, child_name = head_name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, new)
    return new


def head_block(model: nn.Module, head_name: str) -> list[str]:
    """The head plus the parameter-free modules next to it in its Sequential (dropout, pooling).

    Features are the input of this block, so a cached-feature head still sees
    its dropout in training.
    """
    parent_name, _, child_name = head_name.rpartition(".")
    parent = model.get_submodule(parent_name)
    if not isinstance(parent, nn.Sequential):
        return [head_name]
    names = [name for name, _ in parent.named_children()]
    start = end = names.index(child_name)
    while start > 0 and not has_params(parent.get_submodule(names[start - 1])):
        start -= 1
    while end + 1 < len(names) and not has_params(parent.get_submodule(names[end + 1])):
        end += 1
    prefix = f"{parent_name}." if parent_name else ""
    return [prefix + name for name in names[start : end + 1]]


class _InputReached(Exception):
    """Raised by a hook to stop the forward pass once a module's input is known."""

    def __init__(self, args: tuple, kwargs: dict) -> None:
        self.inputs = (args, kwargs)


def input_of(model: nn.Module, module: nn.Module, images: torch.Tensor) -> tuple[tuple, dict] | None:
    """The positional and keyword inputs `module` first receives when `model` runs on `images` (the rest of the
    forward is not run), or None when the forward never reaches it."""

    def stop(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        raise _InputReached(args, kwargs)

    handle = module.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        model(images)
    except _InputReached as reached:
        return reached.inputs
    finally:
        handle.remove()
    return None


def hook_split(
    model: nn.Module, block: list[str]
) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """forward_features / forward_head for a model whose forward ends with `block`."""
    first = model.get_submodule(block[0])
    modules = [model.get_submodule(name) for name in block]

    def forward_features(images: torch.Tensor) -> torch.Tensor:
        inputs = input_of(model, first, images)
        if inputs is None:
            raise ThawError(f"the forward pass never reached the head {block[0]!r}; name the head explicitly")
        return inputs[0][0]

    def forward_head(features: torch.Tensor) -> torch.Tensor:
        out = features
        for module in modules:
            out = module(out)
        # A 1x1-conv head (SqueezeNet) ends in pooled maps that forward flattens.
        return torch.flatten(out, 1) if out.dim() > 2 else out

    return forward_features, forward_head


@dataclass
class _Unit:
    """A candidate piece of a group: one module, or the parameters a module owns directly."""

    path: str
    params: list[str]
    module: nn.Module | None  # None for directly-owned parameters (ViT's class_token)
    members: list[str] = field(default_factory=list)

    @property
    def is_leaf(self) -> bool:
        return self.module is not None and not any(has_params(c) for c in self.module.children())


class _Grouper:
    """Walks the module tree, splitting trunks, to produce ordered layer groups."""

    def __init__(self, model: nn.Module, head_modules: list[str]) -> None:
        self.model = model
        self.head_modules = set(head_modules)
        self.canonical = {id(p): name for name, p in model.named_parameters()}
        self.claimed: set[str] = set()

    def _params_of(self, module: nn.Module, prefix: str, recurse: bool) -> list[str]:
        names = []
        for param in module.parameters(recurse=recurse):
            name = self.canonical[id(param)]
            if name not in self.claimed and not self._in_head(name):
                self.claimed.add(name)
                names.append(name)
        return names

    def _in_head(self, param_name: str) -> bool:
        return any(is_within(param_name, head) for head in self.head_modules)

    def units_of(self, module: nn.Module, prefix: str) -> list[_Unit]:
        units = []
        direct = self._params_of(module, prefix, recurse=False)
        if direct:  # a module's own parameters beside its children's (a ViT encoder's position embedding): named by
            # themselves, as the module's name would also take in every child, each in a group of its own
            units.append(_Unit(prefix, direct, None, list(direct)) if prefix else _Unit("<root>", direct, None))
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if path in self.head_modules or not has_params(child):
                continue
            if any(head.startswith(path + ".") for head in self.head_modules):
                units.extend(self.units_of(child, path))
                continue
            params = self._params_of(child, path, recurse=True)
            if params:
                units.append(_Unit(path, params, child, [path]))
        return units

    def expand(self, unit: _Unit) -> list[_Unit]:
        self.claimed.difference_update(unit.params)
        return self.units_of(unit.module, unit.path)


def _split_trunks(grouper: _Grouper, units: list[_Unit]) -> list[_Unit]:
    numel = {name: p.numel() for name, p in grouper.model.named_parameters()}

    def weight(unit: _Unit) -> int:
        return sum(numel[name] for name in unit.params)

    settled: set[int] = set()
    while True:
        splittable = [u for u in units if u.module is not None and not u.is_leaf and id(u) not in settled]
        if not splittable:
            return units
        biggest = max(splittable, key=weight)
        total = sum(weight(u) for u in units) or 1
        if len(units) >= MIN_GROUPS and weight(biggest) <= TRUNK_SHARE * total:
            return units
        pieces = grouper.expand(biggest)
        standing = [piece for piece in pieces if not _joins_neighbour(piece)]
        if len(standing) == 0 or (len(standing) == 1 and standing[0].is_leaf):
            # Splitting would only rename the group (conv + its norm): keep it whole. A lone piece that holds layers
            # of its own is split on (a torchvision ViT's encoder: its position embedding, its 12 layers, a norm).
            grouper.claimed.update(biggest.params)
            settled.add(id(biggest))
            continue
        index = units.index(biggest)
        units[index : index + 1] = pieces


def _joins_neighbour(unit: _Unit) -> bool:
    return unit.module is None or (unit.is_leaf and is_norm(unit.module))


def _merge_small_units(units: list[_Unit]) -> list[_Unit]:
    """A norm layer joins the layer before it; loose parameters join their neighbour."""
    merged: list[_Unit] = []
    pending: list[_Unit] = []  # loose parameters seen before any layer
    for unit in units:
        if _joins_neighbour(unit) and merged:
            merged[-1].params.extend(unit.params)
            merged[-1].members.extend(unit.members or [unit.path])
        elif unit.module is None:
            pending.append(unit)
        else:
            for loose in pending:
                unit.params[:0] = loose.params
                unit.members.insert(0, loose.path)
            pending.clear()
            merged.append(unit)
    return merged


def infer_groups(model: nn.Module, head_modules: list[str], order: list[str] | None = None) -> list[LayerGroup]:
    """Ordered groups from stem to head by the general rule (see module docstring); `order` (forward_order): the
    groups in the order the forward pass calls them, not the order they were registered in."""
    grouper = _Grouper(model, head_modules)
    units = _merge_small_units(_split_trunks(grouper, grouper.units_of(model, "")))
    if order:
        units = _in_forward_order(units, order)
    groups = []
    for index, unit in enumerate(units):
        name = "stem" if index == 0 and len(unit.members) > 1 else unit.path
        groups.append(LayerGroup(name, tuple(unit.members or [unit.path]), tuple(unit.params)))
    head_params = [name for name, _ in model.named_parameters() if any(is_within(name, h) for h in head_modules)]
    groups.append(LayerGroup("head", tuple(head_modules), tuple(head_params)))
    return groups


def _in_forward_order(units: list[_Unit], order: list[str]) -> list[_Unit]:
    """`units` sorted by the first call of any of their modules; a unit the forward never calls keeps its place
    after the unit registered before it."""
    position = {name: index for index, name in enumerate(order)}
    keys, last = [], -1.0
    for unit in units:
        called = [position[name] for name in unit.members or [unit.path] if name in position]
        last = float(min(called)) if called else last + 1e-6
        keys.append(last)
    return [unit for _, unit in sorted(zip(keys, units), key=lambda pair: pair[0])]


def explicit_groups(model: nn.Module, spec: dict[str, list[str]], head_modules: list[str]) -> list[LayerGroup]:
    """Groups named by the user, stem first; the head group is added last."""
    taken = [name for name in spec if name in RESERVED_GROUP_NAMES]
    if taken:  # a selector of that name means something else: the group could never be chosen by it
        raise ThawError(
            f"group name {taken[0]!r} is taken ({', '.join(RESERVED_GROUP_NAMES)} mean the new head, every layer and the "
            "LoRA layers); the head group is added by itself: name the other groups otherwise"
        )
    named_one = [name for name, modules in spec.items() if isinstance(modules, str)]
    if named_one:  # each character would be a module name of its own
        raise ThawError(f"group {named_one[0]!r}: expected a list of module names like ['layer1'], got {spec[named_one[0]]!r}")
    canonical = {id(p): name for name, p in model.named_parameters()}
    groups, problems = [], []
    for group_name, module_names in spec.items():
        params: list[str] = []
        for module_name in module_names:
            try:
                params.extend(canonical[id(p)] for p in model.get_submodule(module_name).parameters())
                continue
            except AttributeError:
                pass
            try:  # a parameter held by the model itself (a learned scale, say) is no module: it is named as itself
                params.append(canonical[id(model.get_parameter(module_name))])
            except AttributeError:
                problems.append(f"group {group_name!r}: no module or parameter named {module_name!r}")
        groups.append(LayerGroup(group_name, tuple(module_names), tuple(dict.fromkeys(params))))
    if problems:
        raise ThawError("; ".join(problems))
    head_params = [n for n, _ in model.named_parameters() if any(is_within(n, h) for h in head_modules)]
    groups = [LayerGroup(g.name, g.modules, tuple(p for p in g.params if p not in head_params)) for g in groups]
    groups.append(LayerGroup("head", tuple(head_modules), tuple(head_params)))
    return groups
