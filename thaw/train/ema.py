"""An exponential moving average of the weights (timm's ModelEmaV3) for stages that train pretrained layers.

Fine-tuning runs are short (tens to a few hundred steps a stage), so a fixed decay such as 0.9999 would
leave the average at the stage's starting weights. timm's warmup makes the decay at the k-th update after the
first 1 - (1 + k) ** -0.75 (the first update copies the weights): 0.41 at the second step, 0.90 at the 21st,
0.98 at the 191st, capped at MAX_DECAY. The average's window grows like k ** 0.75: about a third of the steps on
a stage of 100, a fifth on one of 1000, so on a short stage it does not stay at the stage's start.
Frozen tensors are averaged with themselves: they stay bit-identical.
"""

from __future__ import annotations

from torch import nn

from thaw.errors import ThawError

MAX_DECAY = 0.9998
WARMUP_POWER = 0.75


def require_timm() -> type:
    """timm's ModelEmaV3, or one clear line: checked when a run starts, not minutes later when the first stage
    that trains pretrained layers begins."""
    try:
        from timm.utils import ModelEmaV3
    except ImportError:
        raise ThawError("the weight average (ema=True, --ema) uses timm's ModelEmaV3; install it with pip install timm, or train with ema=False (--no-ema)") from None
    return ModelEmaV3


def weight_average(model: nn.Module) -> nn.Module:
    """A ModelEmaV3 over `model` (parameters and buffers), starting at its current weights, on its device."""
    return require_timm()(model, decay=MAX_DECAY, use_warmup=True, warmup_power=WARMUP_POWER)

