"""Applying a thaw plan inside someone else's training loop.

Other trainers own the optimizer, its checkpoint and often an lr scheduler,
and they restore optimizer state before any callback can run. So the driver
builds one optimizer whose groups never change: one per (layer group,
decays or not), covering every parameter. A stage change then only sets
requires_grad, the BatchNorm policy and each group's lr, and drops the state
of parameters that froze. Frozen parameters get no gradient (the trainers
zero gradients to None), so AdamW and SGD skip them: no step, no state, no
weight decay, which `audit` checks. Same groups in every stage means a
checkpoint from any stage loads into a fresh optimizer.
"""

from __future__ import annotations

import torch

from thaw.errors import ThawError
from thaw.models.adapter import ModelAdapter
from thaw.plan import Plan, apply_trainable, resolve_stage
from thaw.plan.optim import make_optimizer, no_decay_names
from thaw.train.schedule import apply_lrs, multiplier


class PlanDriver:
    """Stage by epoch, requires_grad, BatchNorm policy and per-group lrs for an external loop."""

    def __init__(self, adapter: ModelAdapter, plan: Plan, *, schedule: str = "constant", warmup: float = 0.0) -> None:
        self.adapter, self.plan, self.schedule, self.warmup = adapter, plan, schedule, warmup
        self.resolved = [resolve_stage(adapter, stage) for stage in plan.stages]  # validates every stage up front
        self.stage_index: int | None = None

    @property
    def total_epochs(self) -> int:
        return sum(stage.epochs for stage in self.plan.stages)

    def first_epoch(self, stage_index: int) -> int:
        """The 0-based epoch at which `stage_index` begins."""
        return sum(stage.epochs for stage in self.plan.stages[:stage_index])

    def stage_at(self, epoch: int) -> int:
        """The stage that owns 0-based `epoch`; past the plan, the last stage."""
        for index, stage in enumerate(self.plan.stages):
            if epoch < stage.epochs:
                return index
            epoch -= stage.epochs
        return len(self.plan.stages) - 1

    def make_optimizer(self, name: str = "adamw") -> torch.optim.Optimizer:
        """Hand this to the trainer (Lightning's configure_optimizers, the HF Trainer's `optimizers`)."""
        params = dict(self.adapter.model.named_parameters())
        no_decay = no_decay_names(self.adapter)
        groups = []
        for group in self.adapter.groups:
            for decays in (True, False):
                members = [params[n] for n in group.params if (n not in no_decay) == decays]
                if members:
                    groups.append({"params": members, "lr": 0.0, "weight_decay": 0.0, "thaw_group": group.name, "thaw_decay": decays, "thaw_base_lr": 0.0})
        optimizer = make_optimizer(groups, name)
        self.enter(0, optimizer)
        return optimizer

    def enter(self, stage_index: int, optimizer: torch.optim.Optimizer) -> None:
        """Make `stage_index` current: what trains, BatchNorm, base lrs; frozen parameters lose their state."""
        resolved, stage = self.resolved[stage_index], self.plan.stages[stage_index]
        apply_trainable(self.adapter, list(resolved.trainable), stage.batchnorm)
        for group in optimizer.param_groups:
            if "thaw_group" not in group:
                raise ThawError("this optimizer was not made by PlanDriver.make_optimizer; build it with driver.make_optimizer()")
            lr = resolved.group_lrs.get(group["thaw_group"], 0.0)
            group["thaw_base_lr"] = group["lr"] = lr
            group["weight_decay"] = stage.weight_decay if group["thaw_decay"] and lr else 0.0
            for param in group["params"]:
                if not param.requires_grad:
                    optimizer.state.pop(param, None)
                    param.grad = None
        self.stage_index = stage_index
        self.audit(optimizer)

    def set_lrs(self, optimizer: torch.optim.Optimizer, step_in_stage: int, steps_in_stage: int) -> None:
        """Every group's lr = the plan's lr x the schedule at this step (the trainer's own scheduler is overruled)."""
        apply_lrs(optimizer, multiplier(self.schedule, step_in_stage, steps_in_stage, self.warmup))

    def audit(self, optimizer: torch.optim.Optimizer) -> None:
        """Every parameter in exactly one group; frozen ones without gradient or state."""
        names = {id(p): n for n, p in self.adapter.model.named_parameters()}
        seen = [id(p) for group in optimizer.param_groups for p in group["params"]]
        problems = []
        if sorted(seen) != sorted(names):
            problems.append("the optimizer's groups do not hold every parameter exactly once")
        for param in (p for group in optimizer.param_groups for p in group["params"]):
            if not param.requires_grad and (param.grad is not None or param in optimizer.state):
                problems.append(f"frozen parameter {names.get(id(param), '?')} has a gradient or optimizer state")
        if problems:
            raise ThawError("optimizer audit failed: " + "; ".join(problems[:3]))
