"""Optimizer parameter groups from a resolved stage, and the audit every optimizer must pass.

Every trainable parameter sits in exactly one optimizer group; frozen
parameters sit in none, so they get no state, no momentum and no weight decay.
"""

from __future__ import annotations

import torch
from torch import nn

from thaw.errors import ThawError
from thaw.models._structure import is_norm
from thaw.models.adapter import ModelAdapter
from thaw.plan.stages import ResolvedStage


def no_decay_names(adapter: ModelAdapter) -> set[str]:
    """Biases, norm parameters and tokens don't decay (what nanoGPT and timm do)."""
    model = adapter.model
    names = {name for name, p in model.named_parameters() if p.ndim <= 1}
    for module_name, module in model.named_modules():
        if is_norm(module):
            names.update(f"{module_name}.{p}" if module_name else p for p, _ in module.named_parameters())
    skip = getattr(model, "no_weight_decay", None)
    if callable(skip):
        listed = set(skip())
        names.update(name for name, _ in model.named_parameters() if name in listed or name.split(".")[-1] in listed)
    return names


def param_groups(adapter: ModelAdapter, resolved: ResolvedStage) -> list[dict]:
    """One optimizer group per (layer group, decays or not), tagged with the layer group's name."""
    params = dict(adapter.model.named_parameters())
    trainable, no_decay = set(resolved.trainable), no_decay_names(adapter)
    groups = []
    for view in resolved.groups:
        if not view.trainable:
            continue
        members = [name for name in adapter.group(view.name).params if name in trainable]
        for decays in (True, False):
            chosen = [params[n] for n in members if (n not in no_decay) == decays]
            if chosen:
                groups.append(
                    {
                        "params": chosen,
                        "lr": view.lr,
                        "weight_decay": view.weight_decay if decays else 0.0,
                        "thaw_group": view.name,
                        "thaw_decay": decays,
                    }
                )
    return groups


OPTIMIZERS = ("adamw", "sgd")


def make_optimizer(groups: list[dict], name: str = "adamw") -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(groups)
    if name == "sgd":
        return torch.optim.SGD(groups, momentum=0.9)
    raise ThawError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def build_optimizer(adapter: ModelAdapter, resolved: ResolvedStage, name: str = "adamw") -> torch.optim.Optimizer:
    optimizer = make_optimizer(param_groups(adapter, resolved), name)
    audit_optimizer(adapter.model, optimizer)
    return optimizer


def audit_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every trainable parameter in exactly one group, no frozen parameter anywhere, no state for frozen ones."""
    names = {id(p): n for n, p in model.named_parameters()}
    seen: dict[int, int] = {}
    problems = []
    for index, group in enumerate(optimizer.param_groups):
        label = group.get("thaw_group", f"#{index}")
        for param in group["params"]:
            seen[id(param)] = seen.get(id(param), 0) + 1
            if id(param) not in names:
                problems.append(f"group {label} holds a tensor that is not a parameter of the model")
            elif not param.requires_grad:
                problems.append(f"frozen parameter {names[id(param)]} is in optimizer group {label}")
    twice = [names.get(i, "?") for i, count in seen.items() if count > 1]
    if twice:
        problems.append(f"parameters in more than one group: {', '.join(twice[:5])}")
    left_out = [(n, p.numel()) for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    if left_out:
        count = sum(c for _, c in left_out)
        shown = ", ".join(n for n, _ in left_out[:5]) + (" ..." if len(left_out) > 5 else "")
        problems.append(f"{count:,} trainable parameters are in no optimizer group and would never train: {shown}")
    stale = [names[id(p)] for p in optimizer.state if id(p) in names and not p.requires_grad]
    if stale:
        problems.append(f"optimizer holds state for frozen parameters: {', '.join(stale[:5])}")
    if problems:
        raise ThawError("optimizer audit failed: " + "; ".join(problems))
