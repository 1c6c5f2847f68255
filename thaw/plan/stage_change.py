"""Entering a stage: one step that moves everything together, then proves it.

Every path goes through `enter_stage`: thaw's training loop, the Python API
(`thaw.apply_stage`), lr-find and the trainer integrations. Order matters: the
stage is resolved (and validated) before the model is touched, so a bad stage
leaves no half-changed model. Then requires_grad and the BatchNorm policy, then
the optimizer's groups (continuing parameters keep their state; parameters that
froze lose it), then the audit.
"""

from __future__ import annotations

import torch

from thaw.models.adapter import ModelAdapter
from thaw.plan.freeze import apply_trainable
from thaw.errors import ThawError
from thaw.plan.optim import audit_optimizer, is_fixed, make_optimizer, param_groups, shown_names
from thaw.plan.stages import ResolvedStage, Stage, resolve_stage


def retarget(optimizer: torch.optim.Optimizer, groups: list[dict]) -> None:
    """Give an existing optimizer new groups; state survives for parameters that still train."""
    keep = {id(p) for group in groups for p in group["params"]}
    for param in list(optimizer.state):
        if id(param) not in keep:
            del optimizer.state[param]
    optimizer.param_groups.clear()
    for group in groups:
        optimizer.add_param_group(group)


def _set_fixed_groups(optimizer: torch.optim.Optimizer, resolved: ResolvedStage) -> None:
    """Fixed groups keep their members: frozen groups get lr 0, frozen parameters lose gradient and state."""
    for group in optimizer.param_groups:
        lr = resolved.group_lrs.get(group["thaw_group"], 0.0)
        group["thaw_base_lr"] = group["lr"] = lr
        group["weight_decay"] = resolved.stage.weight_decay if group["thaw_decay"] and lr else 0.0
        for param in group["params"]:
            if not param.requires_grad:
                optimizer.state.pop(param, None)
                param.grad = None


def enter_stage(
    adapter: ModelAdapter, stage: Stage, optimizer: torch.optim.Optimizer | None = None, optimizer_name: str = "adamw"
) -> tuple[ResolvedStage, torch.optim.Optimizer]:
    """Make `stage` current: what trains, BatchNorm policy, optimizer groups and lrs; then the audit.

    With no optimizer, one is made (`optimizer_name`); an optimizer with fixed groups
    (thaw.plan.optim.fixed_param_groups, for external trainers) keeps its groups.
    """
    resolved = resolve_stage(adapter, stage)
    _check_trained_in_groups(adapter, resolved)
    apply_trainable(adapter, list(resolved.trainable), stage.batchnorm)
    if optimizer is not None and is_fixed(optimizer):
        _set_fixed_groups(optimizer, resolved)
    else:
        groups = param_groups(adapter, resolved)
        if optimizer is None:
            optimizer = make_optimizer(groups, optimizer_name)
        else:
            retarget(optimizer, groups)
    audit_optimizer(adapter.model, optimizer)
    return resolved, optimizer


def _check_trained_in_groups(adapter: ModelAdapter, resolved: ResolvedStage) -> None:
    """Optimizer groups are made from layer groups, so a parameter the stage trains outside every layer group (a module
    added after thaw.adapt) would be in none: refused before the model is touched. The audit found it only after
    requires_grad was set, and left the model with the stage half entered."""
    grouped = {name for group in adapter.groups for name in group.params}
    outside = [name for name in resolved.trainable if name not in grouped]
    if outside:
        count = sum(adapter.model.get_parameter(name).numel() for name in outside)
        raise ThawError(
            f"stage {resolved.stage.name!r} trains {count:,} parameters that no layer group holds, so no optimizer group "
            f"would: {shown_names(outside)}; a module added to the model after thaw.adapt is in none of its groups: "
            "adapt the model again after changing it"
        )
