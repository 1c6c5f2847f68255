"""Progressive resizing (fastai's trick): the early epochs of a stage that runs the whole network see smaller
crops, which cost less compute; the last epoch sees the full size, the size the model is evaluated at."""

from __future__ import annotations

import math

SIZE_STEP = 16  # crop sizes are multiples of this where the full size is: the sizes networks are usually run at


def progressive_size(final: int, start: float, epoch: int, epochs: int) -> int:
    """The crop size of epoch `epoch` (0-based) of `epochs`: `start` x `final` at the first, growing linearly
    to `final` at the last. A one-epoch stage trains at the full size."""
    if epochs <= 1 or epoch >= epochs - 1:
        return final
    share = start + (1 - start) * epoch / (epochs - 1)
    step = SIZE_STEP if final % SIZE_STEP == 0 else 1
    return max(step, math.floor(final * share / step + 0.5) * step)  # halves round up: 2.5 steps are 3, not 2


def sizes_used(final: int, start: float, stage_epochs: list[int]) -> list[int]:
    """Every crop size smaller than `final` that stages of these epoch counts train at, smallest first."""
    return sorted({progressive_size(final, start, epoch, epochs) for epochs in stage_epochs for epoch in range(epochs)} - {final})
