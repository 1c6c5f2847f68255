"""Selectors: the words users use to say which parameters they mean.

A selector resolves once, by identity, to parameter names:
  all                    every parameter
  head, layer1, stem     a layer group by name
  0:3, -2:, 4            layer groups by index range (Python slice rules)
  norm, batchnorm, conv, linear, embedding
                         every module of that type
  features.1*, fc        module names (fnmatch globs; a module brings its submodules)
  adapters               every LoRA weight added by the lora strategy
"""

from __future__ import annotations

import fnmatch
import re

from torch import nn

from thaw.errors import ThawError
from thaw.models.adapter import ModelAdapter, check_adapter, is_within
from thaw.models.lora import ADAPTERS_SELECTOR, adapter_param_names
from thaw.models._structure import NORM_TYPES

MODULE_TYPES: dict[str, tuple[type[nn.Module], ...]] = {
    "norm": NORM_TYPES,
    "batchnorm": (nn.modules.batchnorm._BatchNorm,),
    "conv": (nn.modules.conv._ConvNd,),
    "linear": (nn.Linear,),
    "embedding": (nn.Embedding,),
}
_RANGE = re.compile(r"^(-?\d*):(-?\d*)$|^(-?\d+)$")


def _group_range(adapter: ModelAdapter, selector: str) -> list[str] | None:
    match = _RANGE.match(selector)
    if match is None:
        return None
    if match.group(3) is not None:
        index = int(match.group(3))
        chosen = adapter.groups[index : index + 1 or None]
    else:
        start = int(match.group(1)) if match.group(1) else None
        stop = int(match.group(2)) if match.group(2) else None
        chosen = adapter.groups[start:stop]
    return [name for group in chosen for name in group.params]


def _module_params(adapter: ModelAdapter, selector: str) -> list[str]:
    canonical = {id(p): name for name, p in adapter.model.named_parameters()}
    wanted_type = MODULE_TYPES.get(selector)
    names: list[str] = []
    for module_name, module in adapter.model.named_modules():
        if wanted_type is not None:
            hit = isinstance(module, wanted_type)
        else:
            hit = bool(module_name) and fnmatch.fnmatchcase(module_name, selector)
        if hit:
            names.extend(canonical[id(p)] for p in module.parameters())
    return names


def _check_not_also_an_index(adapter: ModelAdapter, selector: str) -> None:
    """A group named by digits (an nn.Sequential's child '3') whose name is also another group's index: it meant the
    name without a word, where the user may have meant the index."""
    if not re.fullmatch(r"-?\d+", selector):
        return
    named = adapter.group_names.index(selector)
    index = int(selector)
    if not -len(adapter.groups) <= index < len(adapter.groups) or adapter.groups[index].name == selector:
        return
    other = adapter.groups[index].name
    at = index % len(adapter.groups)
    raise ThawError(
        f"selector {selector!r} names group {selector!r} (index {named}) and is the index of group {other!r}: write "
        f"{named}:{named + 1} for group {selector!r}, or {at}:{at + 1} for {other!r}"
    )


def resolve_one(adapter: ModelAdapter, selector: str) -> list[str]:
    """The parameter names one selector means, in model order; an error if it means none."""
    selector = selector.strip()
    if selector == "all":
        names = [name for name, _ in adapter.model.named_parameters()]
    elif selector == ADAPTERS_SELECTOR:
        names = adapter_param_names(adapter.model)
        if not names:
            raise ThawError("selector 'adapters' matches no parameters: this model has no LoRA layers; use the lora strategy (plan 'lora', --strategy lora)")
    elif selector in adapter.group_names:
        _check_not_also_an_index(adapter, selector)
        names = list(adapter.group(selector).params)
    else:
        names = _group_range(adapter, selector)
        if names is None:
            names = _module_params(adapter, selector)
    if not names:
        raise ThawError(
            f"selector {selector!r} matches no parameters; use all, a group "
            f"({', '.join(adapter.group_names)}), an index range like 0:3, a module type "
            f"({', '.join(MODULE_TYPES)}), or a module-name glob like features.1*"
        )
    return list(dict.fromkeys(names))


def resolve(adapter: ModelAdapter, selectors: list[str] | tuple[str, ...]) -> list[str]:
    """The union of several selectors, in model order; every selector that matches nothing is reported."""
    check_adapter(adapter, "resolve")
    if isinstance(selectors, str):  # each character would be a selector of its own
        raise ThawError(f"expected a list of selectors like ['head'], got {selectors!r}")
    if not isinstance(selectors, (list, tuple)) or not all(isinstance(selector, str) for selector in selectors):
        raise ThawError(f"expected a list of selectors like ['head', 'layer4'], got {selectors!r}")
    chosen: set[str] = set()
    problems = []
    for selector in selectors:
        try:
            chosen.update(resolve_one(adapter, selector))
        except ThawError as error:
            problems.append(str(error))
    if problems:
        raise ThawError(problems[0] if len(problems) == 1 else " | ".join(problems))
    return [name for name, _ in adapter.model.named_parameters() if name in chosen]


def group_of_module(adapter: ModelAdapter, module_name: str) -> str:
    """The group that owns a module (`fc` -> head), for per-group learning rates given by module."""
    for group in adapter.groups:
        if any(is_within(module_name, root) for root in group.modules):
            return group.name
    for group in adapter.groups:
        if any(param.startswith(module_name + ".") for param in group.params):
            return group.name
    raise ThawError(
        f"{module_name!r} is neither a layer group nor a module inside one; groups are: {', '.join(adapter.group_names)}"
    )
