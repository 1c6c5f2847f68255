"""Progressive resizing (fastai's trick): the early epochs of a stage that runs the whole network see smaller
crops, which cost less compute; the last epoch sees the full size, the size the model is evaluated at."""

from __future__ import annotations

SIZE_STEP = 16  # crop sizes are multiples of this where the full size is (convolutional strides divide them evenly)


def progressive_size(final: int, start: float, epoch: int, epochs: int) -> int:
    """The crop size of epoch `epoch` (0-based) of `epochs`: `start` x `final` at the first, growing linearly
    to `final` at the last. A one-epoch stage trains at the full size."""
    if epochs <= 1 or epoch >= epochs - 1:
        return final
    share = start + (1 - start) * epoch / (epochs - 1)
    step = SIZE_STEP if final % SIZE_STEP == 0 else 1
    return min(final, max(step, round(final * share / step) * step))


def smallest_size(final: int, start: float, stage_epochs: list[int]) -> int:
    """The smallest crop any of these stages would train at: the first epoch of the longest."""
    return min((progressive_size(final, start, 0, epochs) for epochs in stage_epochs), default=final)
