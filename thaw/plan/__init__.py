"""Plans: freezing, parameter groups, learning rates and stages, resolved against an adapter."""

from __future__ import annotations

import torch

from thaw.errors import ThawError
from thaw.models.adapter import ModelAdapter, check_adapter
from thaw.plan.config import load_plan, plan_from_dict, plan_to_dict
from thaw.plan.freeze import apply_trainable
from thaw.plan.lr import ConstantLr, DecayLr, ExplicitLr, RangeLr
from thaw.plan.optim import audit_gradients, audit_optimizer, build_optimizer, param_groups
from thaw.plan.report import count_parameters, plan_report, render_plan, trainable_line
from thaw.plan.selectors import resolve
from thaw.plan.stage_change import enter_stage
from thaw.plan.stages import Plan, ResolvedStage, Stage, resolve_plan, resolve_stage
from thaw.plan.strategies import STRATEGIES, build_plan

__all__ = [
    "ConstantLr",
    "DecayLr",
    "ExplicitLr",
    "Plan",
    "RangeLr",
    "ResolvedStage",
    "STRATEGIES",
    "Stage",
    "apply_stage",
    "apply_trainable",
    "audit_gradients",
    "audit_optimizer",
    "build_optimizer",
    "build_plan",
    "count_parameters",
    "enter_stage",
    "load_plan",
    "param_groups",
    "plan_from_dict",
    "plan_to_dict",
    "plan_report",
    "render_plan",
    "resolve",
    "resolve_plan",
    "resolve_stage",
    "trainable_line",
]


def apply_stage(adapter: ModelAdapter, stage: Stage, optimizer: str = "adamw") -> tuple[ResolvedStage, torch.optim.Optimizer]:
    """Freeze, set the BatchNorm policy and build an audited optimizer (`optimizer` names it) for one stage:
    thaw's one stage change, `enter_stage`, with a new optimizer. `batchnorm: adapt` needs the pass over the
    training images that thaw's own loop makes (thaw.train.adapt_bn), so it is refused here."""
    check_adapter(adapter, "apply_stage")
    if not isinstance(stage, Stage):
        raise ThawError(f"apply_stage takes a thaw.Stage (a plan's stages are some), got {stage!r}")
    if stage.batchnorm == "adapt":
        raise ThawError(
            f"stage {stage.name!r} uses batchnorm: adapt, which re-estimates statistics in thaw's own loop; "
            "in your own loop use eval or frozen (or call thaw.train.adapt_bn.adapt_batchnorm before training)"
        )
    return enter_stage(adapter, stage, None, optimizer)
