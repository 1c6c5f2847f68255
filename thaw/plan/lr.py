"""Learning-rate rules: how a stage gives each layer group its lr.

Rules assign an lr to every group (stem = index 0, head = last), frozen or
not, so a group keeps the same lr as later stages unfreeze more of the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from thaw._numbers import as_real
from thaw.errors import ThawError


MAX_LR = 1e3  # far above any fine-tuning lr; past float32's range (3e38) the optimizer step itself overflows


def check_lr(value: float, what: str) -> float:
    lr = as_real(value)
    if lr is None or not math.isfinite(lr) or not 0 < lr <= MAX_LR:
        raise ThawError(f"{what} must be a positive finite number up to {MAX_LR:g}, got {value!r}; try 1e-3 for a head")
    return lr


@dataclass(frozen=True)
class ConstantLr:
    """Every trainable group at one lr (a head-only stage needs nothing else)."""

    lr: float

    def __post_init__(self) -> None:  # refused where it is built, not stages later
        object.__setattr__(self, "lr", check_lr(self.lr, "lr"))

    def lrs(self, group_names: list[str]) -> dict[str, float]:
        return {name: self.lr for name in group_names}


@dataclass(frozen=True)
class RangeLr:
    """fastai's slice(lo, hi): geometric from the stem (lo) to the head (hi)."""

    low: float
    high: float

    def __post_init__(self) -> None:
        low, high = check_lr(self.low, "lr range start"), check_lr(self.high, "lr range end")
        if low > high:  # the stem would train faster than the head: what --lr-range and a plan file refuse
            raise ThawError(f"an lr range goes from the stem to the head, low to high; got {low:g} to {high:g}")
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)

    def lrs(self, group_names: list[str]) -> dict[str, float]:
        low, high = self.low, self.high
        if len(group_names) == 1:  # the head alone: the range's head end (it had the stem's, 100x below by default)
            return {group_names[0]: high}
        steps = len(group_names) - 1
        return {name: low * (high / low) ** (index / steps) for index, name in enumerate(group_names)}


@dataclass(frozen=True)
class DecayLr:
    """Layer-wise decay: each group's lr is head_lr x decay^(groups between it and the head)."""

    head_lr: float
    decay: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "head_lr", check_lr(self.head_lr, "lr"))
        decay = as_real(self.decay)
        if decay is None or not 0 < decay <= 1:  # NaN fails too
            raise ThawError(f"layer decay must be in (0, 1], got {self.decay!r}; 0.75 is a common choice")
        object.__setattr__(self, "decay", decay)

    def lrs(self, group_names: list[str]) -> dict[str, float]:
        head_lr = self.head_lr
        last = len(group_names) - 1
        return {name: head_lr * self.decay ** (last - index) for index, name in enumerate(group_names)}


@dataclass(frozen=True)
class ExplicitLr:
    """An lr per group, named by group or by a module inside it. Trainable groups left out are an error."""

    by_name: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.by_name, dict) or not all(isinstance(name, str) and name for name in self.by_name):
            raise ThawError(f"per-group lrs must be a mapping of group or module names to lrs, got {self.by_name!r}")
        object.__setattr__(self, "by_name", {name: check_lr(lr, f"lr for {name}") for name, lr in self.by_name.items()})

    def lrs(self, group_names: list[str]) -> dict[str, float]:
        # Names are mapped to groups by the plan resolver, which knows the model.
        return {name: lr for name, lr in self.by_name.items() if name in group_names}


LrRule = ConstantLr | RangeLr | DecayLr | ExplicitLr


def describe(rule: LrRule) -> str:
    match rule:
        case ConstantLr(lr):
            return f"{lr:g}"
        case RangeLr(low, high):
            return f"range {low:g}:{high:g}"
        case DecayLr(head_lr, decay):
            return f"{head_lr:g} with layer decay {decay:g}"
        case ExplicitLr(by_name):
            return ", ".join(f"{k}={v:g}" for k, v in by_name.items())
    raise TypeError(rule)
