"""Per-step lr multipliers. thaw sets every group's lr itself each step (base lr x multiplier),
so groups added at a stage change follow the schedule from their first step."""

from __future__ import annotations

import math

import torch


def multiplier(schedule: str, step: int, total: int, warmup: float) -> float:
    """The share of each group's base lr at `step` (0-based) of a stage of `total` steps.
    Past the last step the schedule stays at its end (a cosine must not rise again)."""
    if schedule == "constant" or total <= 1:
        return 1.0
    step = min(max(step, 0), total - 1)
    if schedule == "onecycle":
        # fastai's one-cycle: cosine up from 1/25 over the first quarter, cosine down to ~0.
        peak = max(1, round(0.25 * total))
        if step < peak:
            return 1 / 25 + (1 - 1 / 25) * (1 - math.cos(math.pi * step / peak)) / 2
        progress = (step - peak) / max(1, total - peak)
        return 1e-5 + (1 - 1e-5) * (1 + math.cos(math.pi * progress)) / 2
    warm = max(1, round(warmup * total)) if warmup > 0 else 0
    if step < warm:
        return (step + 1) / (warm + 1)
    progress = (step - warm) / max(1, total - warm)
    return 0.5 * (1 + math.cos(math.pi * progress))


def apply_lrs(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["thaw_base_lr"] * factor
