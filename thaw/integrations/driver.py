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
from thaw.plan import Plan, audit_gradients, audit_optimizer, enter_stage, resolve_stage
from thaw.plan.optim import fixed_param_groups, is_fixed, make_optimizer
from thaw.train.schedule import apply_lrs, multiplier


class PlanDriver:
    """Stage by epoch, requires_grad, BatchNorm policy and per-group lrs for an external loop."""

    def __init__(self, adapter: ModelAdapter, plan: Plan, *, schedule: str = "constant", warmup: float = 0.0) -> None:
        self.adapter, self.plan, self.schedule, self.warmup = adapter, plan, schedule, warmup
        adapting = [stage.name for stage in plan.stages if stage.batchnorm == "adapt"]
        if adapting:  # it needs a pass over the training images at the stage's start, which only thaw's loop makes
            raise ThawError(
                f"stage {adapting[0]!r} uses batchnorm: adapt, which re-estimates statistics in thaw's own loop; "
                "inside another trainer use eval or frozen"
            )
        for stage in plan.stages:  # validates every stage up front
            resolve_stage(adapter, stage)
        self.stage_index: int | None = None
        self.audit_next_step = False  # the first step of each stage proves every trainable parameter got a gradient

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
        optimizer = make_optimizer(fixed_param_groups(self.adapter), name)
        self.enter(0, optimizer)
        return optimizer

    def enter(self, stage_index: int, optimizer: torch.optim.Optimizer) -> None:
        """Make `stage_index` current through thaw's one stage change (fixed groups: lrs change, members do not)."""
        if not is_fixed(optimizer):
            raise ThawError("this optimizer was not made by PlanDriver.make_optimizer; build it with driver.make_optimizer()")
        enter_stage(self.adapter, self.plan.stages[stage_index], optimizer)
        self.stage_index = stage_index
        self.audit_next_step = True

    def set_lrs(self, optimizer: torch.optim.Optimizer, step_in_stage: int, steps_in_stage: int) -> None:
        """Every group's lr = the plan's lr x the schedule at this step (the trainer's own scheduler is overruled)."""
        apply_lrs(optimizer, multiplier(self.schedule, step_in_stage, steps_in_stage, self.warmup))

    def audit(self, optimizer: torch.optim.Optimizer) -> None:
        """thaw's optimizer audit: every parameter in exactly one group; frozen ones without gradient or state."""
        audit_optimizer(self.adapter.model, optimizer)

    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Call with the gradients in place, before the optimizer steps: the first step of each
        stage proves that everything the stage trains got a finite gradient, and nothing else did."""
        if self.audit_next_step:  # presence only: under fp16 a trainer's gradient scaler skips overflowing steps itself
            where = f"the first step of stage {self.plan.stages[self.stage_index].name!r}"
            audit_gradients(self.adapter.model, where, require_finite=False)
            self.audit_next_step = False
