"""thaw: transfer learning and fine-tuning for pretrained PyTorch models.

The path data takes: thaw.data -> thaw.models (adapters) -> thaw.plan
(freezing, groups, lrs, stages) -> training -> export.

The names below are imported when first used (PEP 562), not with the package: `thaw` on the command line starts
without torch, so a Ctrl-C while torch loads is the command's own one-line exit, not a traceback from an import.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

from thaw._version import __version__ as __version__
from thaw.errors import ThawError

_FROM = {
    "thaw.models": ("LayerGroup", "ModelAdapter", "Preprocessing", "adapt", "build_model"),
    "thaw.plan": (
        "Plan", "Stage", "apply_stage", "apply_trainable", "audit_optimizer", "build_optimizer", "build_plan",
        "count_parameters", "load_plan", "plan_report", "resolve", "resolve_stage", "trainable_line",
    ),
}
_MODULE_OF = {name: module for module, names in _FROM.items() for name in names}

__all__ = sorted(["ThawError", *_MODULE_OF])


def __getattr__(name: str) -> object:
    if name not in _MODULE_OF:
        if not name.startswith("_") and importlib.util.find_spec(f"thaw.{name}") is not None:
            return importlib.import_module(f"thaw.{name}")  # thaw.plan.ExplicitLr after a bare `import thaw`, as before
        raise AttributeError(f"module 'thaw' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value  # once: later lookups find it without this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_MODULE_OF})


if TYPE_CHECKING:  # what type checkers and editors see: the same names, imported as usual
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
