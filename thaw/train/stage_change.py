"""Entering a stage: one step that moves everything together, then proves it.

Order matters: the stage is resolved (and validated) before the model is
touched, so a bad stage leaves no half-changed model. Then requires_grad and
the BatchNorm policy, then the optimizer's groups (continuing parameters keep
their state; parameters that froze lose it), then the audit.
"""

from __future__ import annotations

import torch

from thaw.models.adapter import ModelAdapter
from thaw.plan import Stage, apply_trainable, audit_optimizer, param_groups, resolve_stage
from thaw.plan.optim import make_optimizer
from thaw.plan.stages import ResolvedStage


def retarget(optimizer: torch.optim.Optimizer, groups: list[dict]) -> None:
    """Give an existing optimizer new groups; state survives for parameters that still train."""
    keep = {id(p) for group in groups for p in group["params"]}
    for param in list(optimizer.state):
        if id(param) not in keep:
            del optimizer.state[param]
    optimizer.param_groups.clear()
    for group in groups:
        optimizer.add_param_group(group)


def enter_stage(
    adapter: ModelAdapter, stage: Stage, optimizer: torch.optim.Optimizer | None, optimizer_name: str = "adamw"
) -> tuple[ResolvedStage, torch.optim.Optimizer]:
    resolved = resolve_stage(adapter, stage)
    groups = param_groups(adapter, resolved)
    for group in groups:
        group["thaw_base_lr"] = group["lr"]  # the schedule scales this every step
    apply_trainable(adapter, list(resolved.trainable), stage.batchnorm)
    if optimizer is None:
        optimizer = make_optimizer(groups, optimizer_name)
    else:
        retarget(optimizer, groups)
    audit_optimizer(adapter.model, optimizer)
    return resolved, optimizer
