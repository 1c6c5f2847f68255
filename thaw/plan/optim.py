"""Optimizer parameter groups from a resolved stage, and the audit every optimizer must pass.

Every trainable parameter sits in exactly one optimizer group; frozen
parameters sit in none, so they get no state, no momentum and no weight decay.
"""

from __future__ import annotations

import torch
from torch import nn

from thaw.errors import ThawError
from thaw.models._structure import is_norm
from thaw.models.adapter import ModelAdapter, check_adapter
from thaw.plan.stages import ResolvedStage


def _is_torch_layer(module: nn.Module) -> bool:
    """An instance of a torch.nn layer or of a subclass of one (timm's Linear), not a plain container."""
    for cls in type(module).__mro__:
        if cls.__module__.startswith("torch.nn"):
            return cls not in (nn.Module, nn.Sequential, nn.ModuleList, nn.ModuleDict)
    return False


def _tokens(model: nn.Module) -> set[str]:
    """Tokens: parameters a model's own module holds outside any torch.nn layer, broadcast over the
    batch (a leading dimension of 1): ViT's class token and position embedding. timm lists these in
    no_weight_decay(); torchvision lists nothing, so the structure decides. A weight matrix held the
    same way (Hugging Face's Conv1D) does not qualify and decays."""
    names = set()
    for module_name, module in model.named_modules():
        if _is_torch_layer(module):
            continue
        prefix = f"{module_name}." if module_name else ""
        names.update(prefix + n for n, p in module.named_parameters(recurse=False) if p.ndim > 1 and p.shape[0] == 1)
    return names


def no_decay_names(adapter: ModelAdapter) -> set[str]:
    """Biases, norm parameters and tokens don't decay (what nanoGPT and timm do)."""
    model = adapter.model
    names = {name for name, p in model.named_parameters() if p.ndim <= 1} | _tokens(model)
    for module_name, module in model.named_modules():
        if is_norm(module):
            names.update(f"{module_name}.{p}" if module_name else p for p, _ in module.named_parameters())
    skip = getattr(model, "no_weight_decay", None)
    if callable(skip):
        listed = set(skip())
        names.update(name for name, _ in model.named_parameters() if name in listed or name.split(".")[-1] in listed)
    return names


def param_groups(adapter: ModelAdapter, resolved: ResolvedStage) -> list[dict]:
    """One optimizer group per (layer group, decays or not), tagged with the layer group's name.
    `thaw_base_lr` is the plan's lr; the schedule scales it at every step."""
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
                weight_decay = view.weight_decay if decays else 0.0
                groups.append(_group(chosen, view.lr, weight_decay, view.name, decays))
    return groups


def check_decay_below_lr(adapter: ModelAdapter, resolved: tuple[ResolvedStage, ...]) -> None:
    """Where an optimizer group's lr times its weight decay reaches 1, each step moves every weight it decays past zero
    (AdamW's decoupled decay and SGD's alike): `--weight-decay 1e30` trained to weights 1e27 times too large, or ended
    in a NaN line that blamed the lr. Refused for a new plan before any work, naming the stage, the group and both
    numbers; groups that decay nothing (norms, biases) are not counted."""
    for stage in resolved:
        decayed = [group for group in param_groups(adapter, stage) if group["weight_decay"]] if stage.stage.epochs else []
        worst = max(decayed, key=lambda group: group["lr"] * group["weight_decay"], default=None)
        if worst is not None and worst["lr"] * worst["weight_decay"] >= 1:
            raise ThawError(
                f"stage {stage.stage.name!r}: lr x weight decay is {worst['lr'] * worst['weight_decay']:.3g} in group "
                f"{worst['thaw_group']!r} (lr {worst['lr']:g}, weight decay {worst['weight_decay']:g}): each step would move "
                "every decayed weight past zero; lower the weight decay (weight_decay, --weight-decay) or the lr until their "
                "product is well below 1 (AdamW's usual: lr 1e-3, weight decay 0.01 to 0.1)"
            )


def _group(params: list[nn.Parameter], lr: float, weight_decay: float, name: str, decays: bool, fixed: bool = False) -> dict:
    return {
        "params": params, "lr": lr, "thaw_base_lr": lr, "weight_decay": weight_decay,
        "thaw_group": name, "thaw_decay": decays, "thaw_fixed": fixed,
    }


def fixed_param_groups(adapter: ModelAdapter) -> list[dict]:
    """Groups that never change: every parameter, one group per (layer group, decays or not).
    For trainers that restore optimizer state before any callback runs (Lightning, the HF
    Trainer); a stage change then only sets lrs, and frozen parameters sit at lr 0 with no
    gradient, so no optimizer steps or decays them."""
    params = dict(adapter.model.named_parameters())
    no_decay = no_decay_names(adapter)
    groups = []
    for group in adapter.groups:
        for decays in (True, False):
            members = [params[n] for n in group.params if (n not in no_decay) == decays]
            if members:
                groups.append(_group(members, 0.0, 0.0, group.name, decays, fixed=True))
    return groups


def is_fixed(optimizer: torch.optim.Optimizer) -> bool:
    return any(group.get("thaw_fixed") for group in optimizer.param_groups)


OPTIMIZERS = ("adamw", "sgd")


def make_optimizer(groups: list[dict], name: str = "adamw") -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(groups)
    if name == "sgd":
        return torch.optim.SGD(groups, momentum=0.9)
    raise ThawError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def build_optimizer(adapter: ModelAdapter, resolved: ResolvedStage, name: str = "adamw") -> torch.optim.Optimizer:
    check_adapter(adapter, "build_optimizer")
    if not isinstance(resolved, ResolvedStage):  # a Stage is the easy mistake: its lrs are rules, not per-group values yet
        raise ThawError(f"build_optimizer takes a resolved stage (thaw.resolve_stage(adapter, stage) gives one), got {type(resolved).__name__}")
    optimizer = make_optimizer(param_groups(adapter, resolved), name)
    audit_optimizer(adapter.model, optimizer)
    return optimizer


def shown_names(names: list[str]) -> str:
    return ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")


def audit_optimizer(model: nn.Module | ModelAdapter, optimizer: torch.optim.Optimizer) -> None:
    """Every trainable parameter in exactly one group, no state for frozen ones. Frozen parameters
    sit in no group; in fixed groups (is_fixed) they sit at lr 0 with no gradient."""
    if isinstance(model, ModelAdapter):  # as count_parameters takes either
        model = model.model
    if not isinstance(model, nn.Module):
        raise ThawError(f"audit_optimizer takes a model (an nn.Module or a ModelAdapter), got {model!r}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ThawError(f"audit_optimizer takes a torch optimizer (thaw.build_optimizer gives one), got {optimizer!r}")
    names = {id(p): n for n, p in model.named_parameters()}
    fixed = is_fixed(optimizer)
    seen: dict[int, int] = {}
    problems = []
    strangers: dict[str, int] = {}  # per group: a tensor a line, over a whole model, was one line of thousands
    for index, group in enumerate(optimizer.param_groups):
        label = group.get("thaw_group", f"#{index}")
        for param in group["params"]:
            seen[id(param)] = seen.get(id(param), 0) + 1
            if id(param) not in names:
                strangers[label] = strangers.get(label, 0) + 1
            elif not param.requires_grad and not fixed:
                problems.append(f"frozen parameter {names[id(param)]} is in optimizer group {label}")
            elif not param.requires_grad and param.grad is not None:
                problems.append(f"frozen parameter {names[id(param)]} has a gradient")
    problems += [
        f"group {label} holds {count:,} tensor{'s that are not parameters' if count > 1 else ' that is not a parameter'} of the model "
        "(an optimizer made for another model?)" for label, count in strangers.items()
    ]
    twice = [names.get(i, "?") for i, count in seen.items() if count > 1]
    if twice:
        problems.append(f"parameters in more than one group: {shown_names(twice)}")
    left_out = [(n, p.numel()) for n, p in model.named_parameters() if (p.requires_grad or fixed) and id(p) not in seen]
    if left_out:
        count = sum(c for _, c in left_out)
        problems.append(f"{count:,} trainable parameters are in no optimizer group and would never train: {shown_names([n for n, _ in left_out])}")
    stale = [names[id(p)] for p in optimizer.state if id(p) in names and not p.requires_grad]
    if stale:
        problems.append(f"optimizer holds state for frozen parameters: {shown_names(stale)}")
    if problems:
        raise ThawError("optimizer audit failed: " + "; ".join(problems))


def audit_gradients(model: nn.Module, where: str, require_finite: bool = True) -> None:
    """Before a step: every trainable parameter has a (finite) gradient, no frozen one has any.
    A trainable parameter without a gradient is one the forward pass never used: the plan
    says it trains, and it silently would not. `require_finite=False` where a gradient scaler
    (fp16 mixed precision) skips overflowing steps itself."""
    missing, non_finite, frozen = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            if param.grad is not None:
                frozen.append(name)
        elif param.grad is None:
            missing.append(name)
        elif require_finite and not torch.isfinite(param.grad).all():
            non_finite.append(name)
    problems = []
    if missing:
        problems.append(
            f"{len(missing)} trainable parameters got no gradient ({shown_names(missing)}): the forward pass does not use them, "
            "so they would never train; leave them out of the stage's selectors"
        )
    if non_finite:
        problems.append(f"{len(non_finite)} parameters got a NaN or inf gradient ({shown_names(non_finite)}); lower the lr or try --precision fp32")
    if frozen:
        problems.append(f"frozen parameters got a gradient ({shown_names(frozen)})")
    if problems:
        raise ThawError(f"gradient audit failed at {where}: " + "; ".join(problems))
