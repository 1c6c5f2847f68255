"""Where a run is in its whole plan, and how long the rest will take, for the progress bar.

Time left is the steps left in every remaining epoch and stage times the measured seconds per step
of that kind of stage. A head stage on cached features steps far faster than one that runs the
network, so each kind is timed on its own; a kind not timed yet makes the estimate say so.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

CACHED, PREFIX, FULL = "cached head", "cached bottom", "full network"


@dataclass
class PlanProgress:
    epochs: list[int]  # per stage, as planned; a stage that stops early is cut to what it ran
    kinds: list[str]  # per stage: CACHED, PREFIX (only the top trains, on the frozen bottom's cached output) or FULL, predicted at the start, the real one once the stage begins
    steps_per_epoch: int
    timed: dict[str, tuple[float, int]] = field(default_factory=dict)  # kind -> (seconds, steps)
    unit: str = "img"  # what a sample is called in the rate: "img", or "texts" for a text run

    @property
    def total_steps(self) -> int:
        return sum(self.epochs) * self.steps_per_epoch

    def done(self, stage: int, stage_step: int) -> int:
        """Steps done in the whole plan, when `stage_step` steps of `stage` are done."""
        return sum(self.epochs[:stage]) * self.steps_per_epoch + stage_step

    def record(self, kind: str, seconds: float) -> None:
        total, count = self.timed.get(kind, (0.0, 0))
        self.timed[kind] = (total + seconds, count + 1)

    def seconds_left(self, stage: int, stage_step: int) -> tuple[float, list[str]]:
        """Seconds for the steps left, and the kinds of stage still to come that no step has timed yet."""
        left = {kind: 0 for kind in set(self.kinds)}
        left[self.kinds[stage]] += self.epochs[stage] * self.steps_per_epoch - stage_step
        for later in range(stage + 1, len(self.epochs)):
            left[self.kinds[later]] += self.epochs[later] * self.steps_per_epoch
        untimed = sorted(kind for kind, steps in left.items() if steps > 0 and kind not in self.timed)
        seconds = sum(steps * self.timed[kind][0] / self.timed[kind][1] for kind, steps in left.items() if kind in self.timed)
        return seconds, untimed

    def postfix(self, stage: int, stage_step: int, loss: float, images_per_s: float) -> str:
        seconds, untimed = self.seconds_left(stage, stage_step)
        if untimed and not seconds:
            left = "estimating"
        elif untimed:
            left = f">{clock(seconds)}, estimating {' and '.join(untimed)} steps"
        else:
            left = clock(seconds)
        return f"step {self.done(stage, stage_step)}/{self.total_steps}, loss {loss:.3f}, {images_per_s:.0f} {self.unit}/s, plan left {left}"


def clock(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{rest:02d}" if hours else f"{minutes}:{rest:02d}"


def bars_disabled(quiet: bool) -> bool:
    """Bars are for a person at a terminal: off with --quiet, and when stderr goes to a file or a pipe."""
    return quiet or not sys.stderr.isatty()
