"""thaw: transfer learning and fine-tuning for pretrained PyTorch models.

The path data takes: thaw.data -> thaw.models (adapters) -> thaw.plan
(freezing, groups, lrs, stages) -> training -> export.
"""

from thaw._version import __version__ as __version__
from thaw.errors import ThawError
from thaw.models import LayerGroup, ModelAdapter, Preprocessing, adapt, build_model
from thaw.plan import (
    Plan,
    Stage,
    apply_stage,
    apply_trainable,
    audit_optimizer,
    build_optimizer,
    build_plan,
    count_parameters,
    load_plan,
    plan_report,
    resolve,
    resolve_stage,
    trainable_line,
)


__all__ = [
    "LayerGroup",
    "ModelAdapter",
    "Plan",
    "Preprocessing",
    "Stage",
    "ThawError",
    "adapt",
    "apply_stage",
    "apply_trainable",
    "audit_optimizer",
    "build_model",
    "build_optimizer",
    "build_plan",
    "count_parameters",
    "load_plan",
    "plan_report",
    "resolve",
    "resolve_stage",
    "trainable_line",
]
