"""The training step, one epoch of training, and evaluation."""

from __future__ import annotations

import math
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm import tqdm

from thaw.data.loaders import Batch

from thaw.errors import ThawError
from thaw.train.metrics import MetricTracker
from thaw.train.schedule import apply_lrs, multiplier


@dataclass
class Engine:
    """Where and how tensors run: device, precision, memory format."""

    device: torch.device
    bf16: bool
    channels_last: bool
    quiet: bool = False
    failed: list[tuple[str, str]] = field(default_factory=list)
    strict: bool = False
    # Called after every optimizer step with (optimizer, step, lr multiplier): audits, tests, loggers.
    step_hooks: list[Callable[[torch.optim.Optimizer, int, float], None]] = field(default_factory=list)
    distributed: bool = False  # metrics are summed over ranks at the end of each pass
    before_step: Callable[[nn.Module], None] | None = None  # e.g. averaging gradients across ranks

    def finish(self, tracker: MetricTracker) -> MetricTracker:
        if self.distributed:
            tracker.all_reduce()
        return tracker

    def autocast(self) -> AbstractContextManager:
        if not self.bf16:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def to_device(self, images: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor | dict[str, torch.Tensor]:
        if isinstance(images, dict):  # a text batch: token ids and masks, never channels_last
            return {key: value.to(self.device, non_blocking=True) for key, value in images.items()}
        images = images.to(self.device, non_blocking=True)
        if self.channels_last and images.dim() == 4:
            return images.contiguous(memory_format=torch.channels_last)
        return images

    def note_failures(self, failed: list[tuple[str, str]]) -> None:
        if failed and self.strict:
            path, reason = failed[0]
            raise ThawError(f"cannot decode {path} ({reason}); remove it, or drop --strict to skip such files")
        self.failed.extend(f for f in failed if f not in self.failed)


@dataclass
class StageSchedule:
    name: str
    steps_per_epoch: int
    total_steps: int
    warmup: float
    grad_clip: float | None
    accumulate: int

    def factor(self, step: int) -> float:
        return multiplier(self.name, step, self.total_steps, self.warmup)


def _check_finite(value: float, where: str) -> None:
    if not math.isfinite(value):
        raise ThawError(
            f"loss became {value} at {where}; the stage stopped and no checkpoint was overwritten. "
            "Lower the lr (e.g. --lr 1e-4) or add --grad-clip 1.0"
        )


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    engine: Engine,
    schedule: StageSchedule,
    first_step: int,
    label: str,
    num_classes: int,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    tracker: MetricTracker | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> dict:
    """One pass over `loader`; `forward` defaults to the model (the feature cache passes the head).

    When `should_stop` turns true the epoch ends after the current optimizer step,
    and the result says how many batches it consumed.
    """
    forward = forward or model
    model.train()  # frozen BatchNorm layers stay in eval: their hook wins
    tracker = tracker or MetricTracker(num_classes)
    step, started, batches = first_step, time.perf_counter(), 0
    optimizer.zero_grad(set_to_none=True)
    progress = tqdm(loader, desc=label, disable=engine.quiet, leave=False, unit="batch")
    total = len(loader)
    for index, batch in enumerate(progress):
        batches = index + 1
        engine.note_failures(batch.failed)
        if not len(batch.labels):
            continue
        images, labels = engine.to_device(batch.images), batch.labels.to(engine.device)
        with engine.autocast():
            logits = forward(images)
        loss = nn.functional.cross_entropy(logits.float(), labels)
        value = loss.item()  # one device sync a batch, shared by the check, the metrics and the bar
        _check_finite(value, f"{label}, batch {index + 1}")
        (loss / schedule.accumulate).backward()
        stepped = (index + 1) % schedule.accumulate == 0 or index + 1 == total
        if stepped:
            if engine.before_step is not None:
                engine.before_step(model)
            _optimizer_step(model, optimizer, schedule, step)
            for hook in engine.step_hooks:
                hook(optimizer, step, schedule.factor(step))
            step += 1
        tracker.update(logits, labels, value)
        rate = tracker.count / max(time.perf_counter() - started, 1e-9)
        progress.set_postfix(loss=f"{value:.3f}", img_s=f"{rate:.0f}")
        if stepped and should_stop() and index + 1 < total:
            progress.close()
            return {"interrupted": True, "batches": batches, "tracker": tracker, "seconds": time.perf_counter() - started}
    return engine.finish(tracker).summary() | {"seconds": time.perf_counter() - started, "interrupted": False}


def _optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, schedule: StageSchedule, step: int) -> None:
    if schedule.grad_clip:
        trainable = [p for p in model.parameters() if p.requires_grad]
        torch.nn.utils.clip_grad_norm_(trainable, schedule.grad_clip)
    apply_lrs(optimizer, schedule.factor(step))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[Batch],
    engine: Engine,
    num_classes: int,
    label: str = "eval",
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict:
    forward = forward or model
    model.eval()
    tracker, started = MetricTracker(num_classes), time.perf_counter()
    for batch in tqdm(loader, desc=label, disable=engine.quiet, leave=False, unit="batch"):
        engine.note_failures(batch.failed)
        if not len(batch.labels):
            continue
        with engine.autocast():
            logits = forward(engine.to_device(batch.images))
        loss = nn.functional.cross_entropy(logits.float(), batch.labels.to(engine.device))
        tracker.update(logits, batch.labels, loss.item())
    engine.finish(tracker)
    return tracker.summary() | {"seconds": time.perf_counter() - started, "confusion": tracker.confusion.tolist()}
