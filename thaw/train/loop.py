"""The training step, one epoch of training, and evaluation."""

from __future__ import annotations

import math
import time
from functools import partial
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from thaw.data.loaders import Batch
from thaw.distributed import collective_device
from thaw.errors import ThawError
from thaw.plan import audit_gradients
from thaw.train.metrics import MetricTracker
from thaw.train.mixing import Mix
from thaw.train.progress import PlanProgress, bars_disabled
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
    world: int = 1  # processes that train together
    # Fewest samples a training batch needs: 2 where BatchNorm layers use batch statistics (one sample has none).
    min_batch: int = 1
    audit_next_step: str | None = None  # set at a stage change: the next step's gradients are audited
    before_step: Callable[[nn.Module], None] | None = None  # e.g. averaging gradients across ranks
    # The step hooks' view of the step just taken: its mean loss on this rank, samples (all ranks), seconds.
    last_step: dict = field(default_factory=dict)
    progress: PlanProgress | None = None  # the whole plan, for the bar's step count and time left
    stage: int = 0  # the stage being trained, as an index into the plan
    label_smoothing: float = 0.0  # of the training loss (torch's cross_entropy label_smoothing)

    def count_everywhere(self, count: int) -> tuple[int, bool]:
        """A batch's samples summed over every rank, and whether any rank has fewer than `min_batch`
        (then every rank skips it, so their collectives stay matched; one all-reduce under torchrun)."""
        short = int(count < self.min_batch)
        if not self.distributed:
            return count, bool(short)
        totals = torch.tensor([count, short], dtype=torch.long, device=collective_device())
        dist.all_reduce(totals)
        return int(totals[0]), bool(totals[1])

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
        if images.dim() != 4:
            return images
        # Image batches arrive channels_last (NormaliseBatch); without channels_last (--no-channels-last, no convolution)
        # the model reads them in the layout it always did
        return images.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def note_failures(self, failed: list[tuple[str, str]]) -> None:
        if failed and self.strict:
            raise undecodable(*failed[0])
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


def undecodable(path: str, reason: str) -> ThawError:
    """The refusal under strict of a file that does not decode: where the data is read and where a batch is made."""
    return ThawError(f"cannot decode {path} ({reason}); remove it, or drop strict (--strict) to skip such files")


def _check_finite(value: float, where: str, advice: str = "") -> None:
    if not math.isfinite(value):
        raise ThawError(
            f"loss became {value} at {where}; the stage stopped and no checkpoint was overwritten. "
            f"Lower the lr (e.g. lr=1e-4 in plan_options, --lr 1e-4) or clip gradients (grad_clip=1.0, --grad-clip 1.0){advice}"
        )


def decay_advice(optimizer: torch.optim.Optimizer) -> str:
    """Where a group's lr times its weight decay reaches 1, each step moves every weight past zero (AdamW's decoupled
    decay and SGD's alike), and the weights blow up whatever the gradients: `--weight-decay 1e30` ended in a NaN line
    that named only the lr. Said with the product, so the user sees which of the two to lower."""
    products = [group.get("thaw_base_lr", group["lr"]) * group.get("weight_decay", 0.0) for group in optimizer.param_groups]
    worst = max(products, default=0.0)
    if not worst >= 1:
        return ""
    return f"; above all, lower the weight decay (weight_decay, --weight-decay): lr x weight decay is {worst:.3g} and must stay well below 1"


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
    mix: Mix | None = None,
) -> dict:
    """One pass over `loader`; `forward` defaults to the model (the feature cache passes the head);
    `mix` blends each batch and its labels (mixup, cutmix) before the forward pass.

    Gradients are of summed per-sample losses, divided at each optimizer step by the number of
    samples in its accumulation group (over all ranks), so a step is the mean over exactly the
    samples it saw: `--batch-size 8 --accumulate 2` steps like `--batch-size 16`, the last
    partial group included. When `should_stop` turns true the epoch ends after the current
    optimizer step, and the result says how many batches it consumed. `data_wait_share`: the
    share of the epoch spent waiting for the next batch (with no worker processes, preparing it).
    `images`: the samples this pass trained on, every rank's (a resumed epoch's `tracker` already counts those
    before the cut, which this pass's `seconds` do not include).
    """
    forward = forward or model
    advice = decay_advice(optimizer)  # for the line a NaN loss ends the stage with
    model.train()  # frozen BatchNorm layers stay in eval: their hook wins
    tracker = tracker or MetricTracker(num_classes)
    counted_before = tracker.count  # a resumed epoch's images before the cut (resuming mid-epoch is single-process only)
    step, started, batches, in_group = first_step, time.perf_counter(), 0, 0
    group_loss, group_count, step_started, correct_before = 0.0, 0, started, int(tracker.confusion.trace())
    optimizer.zero_grad(set_to_none=True)
    progress = tqdm(loader, desc=_bar_label(engine, label), disable=bars_disabled(engine.quiet), leave=False, unit="batch")
    total = len(loader)
    waited, asked = 0.0, started  # time blocked on the loader: decoding, cropping, or workers that fall behind
    for index, batch in enumerate(progress):
        waited += time.perf_counter() - asked
        batches = index + 1
        engine.note_failures(batch.failed)
        everywhere, some_rank_short = engine.count_everywhere(len(batch.labels))
        if not some_rank_short:
            blend = None if mix is None else partial(mix, index=index)
            value = _forward_backward(forward, batch, engine, f"{label}, batch {index + 1}", tracker, blend, advice)
            in_group += everywhere
            group_loss, group_count = group_loss + value * len(batch.labels), group_count + len(batch.labels)
            rate = (tracker.count - counted_before) / max(time.perf_counter() - started, 1e-9)
            if engine.progress is None:
                progress.set_postfix(loss=f"{value:.3f}", img_s=f"{rate:.0f}")
            else:
                progress.set_postfix_str(engine.progress.postfix(engine.stage, step, value, rate))
        if (index + 1) % schedule.accumulate == 0 or index + 1 == total:
            if in_group:
                now = time.perf_counter()
                correct = int(tracker.confusion.trace())
                engine.last_step = {
                    "loss": group_loss / max(group_count, 1), "accuracy": (correct - correct_before) / max(group_count, 1),
                    "samples": in_group, "seconds": now - step_started,
                }
                correct_before = correct
                _optimizer_step(model, optimizer, engine, schedule, step, in_group)
                if engine.progress is not None:
                    engine.progress.record(engine.progress.kinds[engine.stage], now - step_started)
                step_started = now
            step, in_group, group_loss, group_count = step + 1, 0, 0.0, 0
            if should_stop() and index + 1 < total:
                progress.close()
                return {"interrupted": True, "batches": batches, "tracker": tracker, "seconds": time.perf_counter() - started}
        asked = time.perf_counter()
    seconds = time.perf_counter() - started
    images = engine.finish(tracker).count - counted_before
    return tracker.summary() | {"seconds": seconds, "images": images, "data_wait_share": waited / max(seconds, 1e-9), "interrupted": False}


def _bar_label(engine: Engine, label: str) -> str:
    return label if engine.progress is None else f"stage {engine.stage + 1}/{len(engine.progress.epochs)} {label}"


def _forward_backward(
    forward: Callable, batch: Batch, engine: Engine, where: str, tracker: MetricTracker,
    blend: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None, advice: str = "",
) -> float:
    """Backward of the batch's summed loss (where `blend` is given, of its blended images against its soft targets;
    train accuracy still counts the labels the images had); returns its mean loss per sample."""
    images, labels = engine.to_device(batch.images), batch.labels.to(engine.device)
    targets = labels
    if blend is not None:  # on the device, after the (pinned, asynchronous) copy
        images, targets = blend(images, labels)
        images = engine.to_device(images)  # mixup's sum may come back without the channels_last layout
    with engine.autocast():
        logits = forward(images)
    loss = nn.functional.cross_entropy(logits.float(), targets, reduction="sum", label_smoothing=engine.label_smoothing)
    value = loss.item() / len(labels)  # one device sync a batch, shared by the check, the metrics and the bar
    _check_finite(value, where, advice)
    loss.backward()
    tracker.update(logits, labels, value)
    return value


def _optimizer_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, engine: Engine, schedule: StageSchedule, step: int, samples: int
) -> None:
    """Average (across ranks, then over the group's samples), audit, clip, set lrs, step, hooks, zero."""
    if engine.before_step is not None:
        engine.before_step(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    scale = engine.world / samples  # DDP and the cache's all-reduce average over ranks; this makes it a per-sample mean
    for param in trainable:
        if param.grad is not None:
            param.grad.mul_(scale)
    if engine.audit_next_step is not None:  # the first step of a stage (or after a resume)
        audit_gradients(model, engine.audit_next_step)
        engine.audit_next_step = None
    if schedule.grad_clip:
        torch.nn.utils.clip_grad_norm_(trainable, schedule.grad_clip)
    factor = schedule.factor(step)
    apply_lrs(optimizer, factor)
    optimizer.step()
    for hook in engine.step_hooks:  # before zero_grad: hooks see the gradients this step used
        hook(optimizer, step, factor)
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[Batch],
    engine: Engine,
    num_classes: int,
    label: str = "eval",
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    observe: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> dict:
    """Metrics of one pass; `observe` sees each batch's float logits and labels (on the CPU), in loader order."""
    forward = forward or model
    model.eval()
    tracker, started = MetricTracker(num_classes), time.perf_counter()
    for batch in tqdm(loader, desc=label, disable=bars_disabled(engine.quiet), leave=False, unit="batch"):
        engine.note_failures(batch.failed)
        if not len(batch.labels):
            continue
        with engine.autocast():
            logits = forward(engine.to_device(batch.images))
        loss = nn.functional.cross_entropy(logits.float(), batch.labels.to(engine.device))
        tracker.update(logits, batch.labels, loss.item())
        if observe is not None:
            observe(logits.detach().float().cpu(), batch.labels.cpu())
    engine.finish(tracker)
    return tracker.summary() | {"seconds": time.perf_counter() - started, "confusion": tracker.confusion.tolist()}
