"""A time budget (`--budget 3m`): epochs per stage chosen to fit the time, from throughput measured on this machine.

Before the first stage, a few batches of the run's own data are timed (the run's weights, statistics and random
state are left as they were, so the run that follows is the one an unbudgeted run with the same epochs would be):
a forward pass per image (what the feature cache and every val pass cost), a training step per image (forward,
backward and an AdamW step on a copy of the model with what the costliest stage trains, decoding and augmentation
included), a step of the top groups on the frozen bottom's output where a stage trains them over cached inputs
(head-top-all's top stage), and a head step.
Stages that train the head alone on cached features are cheap: they keep their planned epochs. The time left goes
to the stages that train layers (over cached inputs or on the images), shared in proportion to their planned
epochs, each at its own cost per epoch, up to MAX_EPOCHS each: that is where more epochs still change the model;
what rounding down leaves buys one more epoch of each, in stage order, where it fits.
At the start of every later stage the epochs from there on are fitted again to the time actually left, at the same
estimated cost per epoch, so what the estimates of the stages before got wrong (the feature cache pass, say) is
spent or saved there. While training, an epoch that the measured time of the stage's last epoch says would end past
the budget is not started; the run ends there, with the best epoch so far. The first epoch of a run always runs: a run must deliver a model.
"""

from __future__ import annotations

import copy
import math
import re
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from thaw._numbers import is_decimal
from thaw.data.loaders import Batch
from thaw.errors import ThawError
from thaw.models.adapter import ModelAdapter
from thaw.plan import Plan
from thaw.plan.freeze import BatchNormPolicy, batch_norms, batchnorm_layers, batchnorm_trains, locks_statistics
from thaw.train.loop import Engine
from thaw.train.prefix_cache import Entry, capture, tail_forward
from thaw.train.progress import CACHED, FULL, PREFIX, clock

MAX_EPOCHS = 20  # per stage: past this a longer cosine schedule on a small set mostly overfits
MARGIN = 0.1  # of the budget, kept back for what the estimates miss (checkpoints, the weight average's updates, plots)
PROBE_BATCHES = 3  # timed after one untimed batch (worker start-up, first-call allocations)
HEAD_BACKWARD_FACTOR = 3  # a forward and a backward step of the head cost about three forwards; the head is a small share anyway
UNITS = {"s": 1, "m": 60, "h": 3600}


NUMBER = r"\d+(?:\.\d+)?"


def parse_budget(text: str) -> float:
    """'90s', '3m', '1.5h', '1h30m' (or a bare number of seconds) as seconds; one clear line for anything else."""
    written = str(text)  # a plan file's bare number arrives as a number, or as text where YAML 1.1 reads 6e2 as text
    if is_decimal(written):  # a bare number, as float() writes it too (1e-07)
        seconds = float(written)
    elif re.fullmatch(rf"(?:\s*{NUMBER}\s*[smh])+\s*", written, re.ASCII) and _units_in_order(written):
        parts = re.findall(rf"({NUMBER})\s*([smh])", written)
        _refuse_overflowing_parts(text, parts)
        seconds = sum(float(number) * UNITS[unit] for number, unit in parts)
    else:
        seconds = 0.0
    if not seconds > 0 or not math.isfinite(seconds):
        raise ThawError(f"budget must be a time above 0, like 90s, 3m, 1.5h or 1h30m (a bare number is seconds), got {text!r}")
    return seconds


def _refuse_overflowing_parts(text: str, parts: list[tuple[str, str]]) -> None:
    """After a larger unit, minutes and seconds stay below 60: '1h90m' is more likely a typo of 1h09m or 1h50m
    than a way to write 2h30m, and planning the wrong time costs a whole run."""
    for number, unit in parts[1:]:
        if float(number) >= 60:
            raise ThawError(f"budget {text!r}: {number}{unit} after a larger unit must be below 60{unit}, "
                            f"like 1h30m; or give the time in one unit, like 150m")


def _units_in_order(text: str) -> bool:
    """Each unit once, largest first: 1h30m, not 30m1h or 3m3m (a typo, read as some sum, would plan the wrong time)."""
    units = re.findall(r"[smh]", text)
    return units == sorted(set(units), key="hms".index)


@dataclass(frozen=True)
class Costs:
    """Seconds per image, measured on this machine with the run's data, batch size, precision and workers."""

    forward: float  # evaluation view, no gradients: the cache pass and every val pass
    train_step: float  # augmented, forward and backward through the whole network
    head_step: float  # the head alone on features
    top_step: float = 0.0  # the top groups on the frozen bottom's cached output (a stage that enters mid-network)


@dataclass(frozen=True)
class TopStage:
    """The costliest stage that trains its top groups over cached inputs: what it trains, its BatchNorm policy,
    and where it enters the network."""

    trainable: frozenset[str]
    batchnorm: BatchNormPolicy
    entry: Entry


@dataclass(frozen=True)
class Split:
    """How a budget was spent: the epochs chosen per stage and the seconds expected for each part."""

    budget_s: float
    epochs: tuple[int, ...]
    expected_s: dict[str, float]  # "setup", "feature cache", then each stage by name
    epoch_s: tuple[float, ...]  # expected seconds of one epoch, per stage
    cache_s: float = 0.0  # expected seconds of the feature cache passes, all of them
    passes: int = 1  # feature cache passes planned (a head stage that shares the next stage's entry makes one for both)
    full_epoch_s: float = 0.0  # an epoch of the network on the images: a stage planned over cached inputs may fall back to it
    kinds: tuple[str, ...] = ()  # per stage, as planned: CACHED, PREFIX or FULL
    shared: tuple[int, ...] = ()  # the head stages planned to take their features at the next stage's entry

    @classmethod
    def from_dict(cls, saved: dict) -> Split:
        return cls(
            saved["seconds"], tuple(saved["epochs"]), saved["expected_s"], tuple(saved["epoch_s"]), saved.get("cache_s", 0.0),
            saved.get("passes", 1), saved.get("full_epoch_s", 0.0), tuple(saved.get("kinds", ())), tuple(saved.get("shared", ())),
        )

    def describe(self) -> str:
        parts = ", ".join(f"{name} {clock(seconds)}" for name, seconds in self.expected_s.items())
        return f"budget {clock(self.budget_s)}: epochs per stage {list(self.epochs)}; expected {parts}"

    def to_dict(self) -> dict:
        return {
            "seconds": self.budget_s, "epochs": list(self.epochs), "expected_s": {k: round(v, 1) for k, v in self.expected_s.items()},
            "epoch_s": list(self.epoch_s), "cache_s": self.cache_s, "passes": self.passes, "full_epoch_s": self.full_epoch_s,
            "kinds": list(self.kinds), "shared": list(self.shared),
        }


def split_budget(
    plan: Plan, kinds: list[str], costs: Costs, sizes: dict[str, int], budget_s: float, spent_s: float, views: int,
    shared: frozenset[int] = frozenset(),
) -> tuple[Plan, Split]:
    """Epochs per stage that fit `budget_s`, `spent_s` of it already gone (setup, the measurement).

    `kinds` says which stages train the head on cached features (CACHED), their top groups on the frozen bottom's
    cached output (PREFIX) or the network on the images (FULL); `shared` holds the head stages that take their
    features at the next stage's entry, so that one pass serves both; `sizes` holds the train and val image counts.
    Each stage that trains layers gets floor(planned epochs x share) epochs, the share that fills the time left;
    then, in stage order, one more epoch each where the time still left fits it (so a cheap top stage is not left
    out when one epoch of everything does not fit).
    """
    train, val = sizes["train"], sizes["val"]
    epoch_s = tuple(_epoch_seconds(kinds, index, costs, train, val, index in shared) for index in range(len(kinds)))
    full_epoch = _epoch_seconds([FULL], 0, costs, train, val, False)
    per_pass = (train * max(1, views) + val) * costs.forward
    fixed = sum(stage.epochs * seconds for stage, kind, seconds in zip(plan.stages, kinds, epoch_s) if kind == CACHED)
    planned = [stage.epochs for stage in plan.stages]
    left = budget_s * (1 - MARGIN) - spent_s - fixed
    epochs, passes = _fit_with_passes(kinds, planned, epoch_s, range(len(kinds)), shared, None, per_pass, left)
    cache_pass = passes * per_pass
    if not any(epochs):
        raise ThawError(
            f"a budget of {clock(budget_s)} does not fit one epoch here (an epoch of the full network takes about "
            f"{clock(full_epoch)}, the set-up took {clock(spent_s)}); give a larger --budget"
        )
    expected = {"setup": spent_s} | ({"feature cache": cache_pass} if cache_pass else {})
    for stage, count, seconds in zip(plan.stages, epochs, epoch_s):
        expected[str(stage.name)] = count * seconds
    split = Split(budget_s, tuple(epochs), expected, epoch_s, cache_pass, passes, full_epoch, tuple(kinds), tuple(sorted(shared)))
    return with_epochs(plan, tuple(epochs)), split


def _fit_epochs(planned: list[int], epoch_s: tuple[float, ...], scaled: list[int], left: float) -> list[int]:
    """`planned` with the stages in `scaled` given floor(planned x share) epochs, the share that fills `left` seconds
    (the planned ratio between them is kept), then, in stage order, one more each where what is left still fits it."""
    epochs = list(planned)
    scaled = [index for index in scaled if planned[index]]
    total = sum(planned[index] * epoch_s[index] for index in scaled)
    if not scaled or not total:
        return epochs
    share = max(left, 0.0) / total
    for index in scaled:
        epochs[index] = min(MAX_EPOCHS, math.floor(planned[index] * share))
    unspent = max(left, 0.0) - sum(epochs[index] * epoch_s[index] for index in scaled)
    for index in scaled:  # the rounding's remainder
        if epochs[index] < MAX_EPOCHS and epoch_s[index] <= unspent:
            epochs[index] += 1
            unspent -= epoch_s[index]
    return epochs


def resplit(split: Split, planned: tuple[int, ...], first: int, left_s: float, cache_ready: bool) -> tuple[int, ...]:
    """The epochs again from stage `first` on, to fit the `left_s` seconds actually left (the margin already kept
    back): what the estimates of the stages before got wrong, the feature cache pass above all, is spent or saved
    here. Earlier stages keep their epochs, head stages their planned ones; `cache_ready`: stage `first` finds its
    cached inputs built by the stage before."""
    kinds, later = split.kinds, range(first, len(split.kinds))
    per_pass = split.cache_s / max(1, split.passes)
    fixed = sum(planned[index] * split.epoch_s[index] for index in later if kinds[index] == CACHED)
    fitted, _ = _fit_with_passes(kinds, list(planned), split.epoch_s, later, frozenset(split.shared), cache_ready, per_pass, left_s - fixed)
    return tuple(split.epochs[:first]) + tuple(fitted[first:])


def _fit_with_passes(
    kinds: Sequence[str], planned: list[int], epoch_s: tuple[float, ...], stages: range, shared: frozenset[int],
    ready: bool | None, per_pass: float, left: float,
) -> tuple[list[int], int]:
    """_fit_epochs over the stages in `stages` that train layers, `left` seconds less their feature cache passes;
    a stage left no epoch makes no pass, so where one is, the others are fitted again without it (it staying at
    none). Returns the epochs and the passes they make."""
    scaled = [index for index in stages if kinds[index] != CACHED]
    passes = _passes(kinds, planned, stages, shared, ready)
    epochs = _fit_epochs(planned, epoch_s, scaled, left - passes * per_pass)
    if _passes(kinds, epochs, stages, shared, ready) < passes:
        passes = _passes(kinds, epochs, stages, shared, ready)
        kept = [0 if index in scaled and not epochs[index] else count for index, count in enumerate(planned)]
        epochs = _fit_epochs(kept, epoch_s, scaled, left - passes * per_pass)
    return epochs, passes


def _passes(kinds: Sequence[str], epochs: Sequence[int], stages: range, shared: frozenset[int], ready: bool | None) -> int:
    """Feature cache passes among `stages` with these epochs: one per stage on cached inputs that has an epoch,
    unless the stage before it shares its pass (and trains). `ready` (a refit): whether the first of `stages`
    finds its inputs cached already, which then decides for it alone."""
    def makes_one(index: int) -> bool:
        if kinds[index] == FULL or not epochs[index]:
            return False
        if ready is not None and index == stages.start:
            return not ready
        return not (index - 1 in shared and epochs[index - 1])

    return sum(1 for index in stages if makes_one(index))


def _epoch_seconds(kinds: list[str], index: int, costs: Costs, train: int, val: int, shared: bool) -> float:
    """Expected seconds of one epoch of stage `index` (its train images, then val)."""
    top_forward = costs.top_step / HEAD_BACKWARD_FACTOR
    if kinds[index] == FULL:
        return train * costs.train_step + val * costs.forward
    if kinds[index] == PREFIX:
        return train * costs.top_step + val * top_forward
    # A head stage that takes its features at the next stage's entry runs the frozen top forward in every epoch.
    return (train + val) * (costs.head_step + (top_forward if shared else 0.0))


def with_epochs(plan: Plan, epochs: tuple[int, ...]) -> Plan:
    """`plan` with these epochs per stage."""
    return replace(plan, stages=tuple(replace(stage, epochs=count) for stage, count in zip(plan.stages, epochs)))


def measure_costs(
    adapter: ModelAdapter, train_batches: Iterable, eval_batches: Iterable, engine: Engine, trainable: frozenset[str] | None = None,
    batchnorm: BatchNormPolicy = "frozen", top: TopStage | None = None,
) -> Costs:
    """Seconds per image of a forward pass, a training step of `trainable` (default: every parameter) under the
    stage's BatchNorm policy `batchnorm`, a head step, and with `top` a step of its top groups on cached inputs.

    The training steps run on a copy of the model; the run's own weights, BatchNorm statistics and gradients are
    untouched, and torch's random state (the copy's dropout masks) is restored.
    """
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(engine.device) if engine.device.type == "cuda" else None
    model, training = adapter.model, adapter.model.training
    try:
        model.eval()
        forward = _seconds_per_image(eval_batches, engine, lambda images, labels: _forward(model, images, engine))
        first = next(iter(eval_batches))
        features = _features(adapter, first, engine)
        head_step = HEAD_BACKWARD_FACTOR * _seconds_per_image(
            [features] * (PROBE_BATCHES + 1), engine, lambda images, labels: _forward(adapter.forward_head, images, engine)
        )
        top_step = _top_step(adapter, first, engine, top) if top is not None else 0.0
        if trainable is not None and not trainable:  # no stage trains layers on the images: nothing more to time
            return Costs(forward, HEAD_BACKWARD_FACTOR * forward, head_step, top_step)
        probe, optimizer = _training_copy(adapter, trainable, batchnorm)
        step = lambda images, labels: _train_step(probe, optimizer, images, labels, engine)  # noqa: E731
        # A batch of one image cannot pass a BatchNorm layer that normalises with batch statistics; where none does
        # (batch size 1 with statistics fixed), batches of one are what the run trains on
        fewest = 2 if any(layer.training for _, layer in batch_norms(probe)) else 1
        train_step = _seconds_per_image((batch for batch in train_batches if len(batch.labels) >= fewest), engine, step)
        del probe, optimizer
    finally:
        model.train(training)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, engine.device)
    return Costs(forward, train_step, head_step, top_step)


def _training_copy(adapter: ModelAdapter, trainable: frozenset[str] | None, batchnorm: BatchNormPolicy) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A copy of the model in train mode that trains `trainable` (None: everything) with AdamW, its BatchNorm layers
    as the stage runs them: one that normalises with batch statistics costs more, forward and backward."""
    probe = copy.deepcopy(adapter.model).train()
    for name, param in probe.named_parameters():
        param.requires_grad_(trainable is None or name in trainable)
    chosen = {name for name, param in probe.named_parameters() if param.requires_grad}
    for name, layer in batchnorm_layers(probe):
        if locks_statistics(batchnorm, batchnorm_trains(adapter, name, layer, chosen)):
            layer.eval()
    return probe, torch.optim.AdamW([param for param in probe.parameters() if param.requires_grad])


def _top_step(adapter: ModelAdapter, batch: Batch, engine: Engine, top: TopStage) -> float:
    """Seconds per image of a training step of the top groups from the entry on, fed the frozen bottom's output."""
    images, labels = batch.images, batch.labels
    if len(labels) < 2:  # BatchNorm with batch statistics in the top needs two images
        images, labels = torch.cat([images, images]), torch.cat([labels, labels])
    with torch.no_grad(), engine.autocast():
        bottom = capture(adapter.model, top.entry)(engine.to_device(images))  # eval mode, as the cache computes it
    probe, optimizer = _training_copy(adapter, top.trainable, top.batchnorm)
    forward = tail_forward(probe, top.entry)
    step = lambda images, labels: _train_step(forward, optimizer, images, labels, engine)  # noqa: E731
    return _seconds_per_image([Batch(bottom, labels, [])] * (PROBE_BATCHES + 1), engine, step)


@torch.no_grad()
def _forward(module, images: torch.Tensor, engine: Engine) -> None:
    with engine.autocast():
        module(images)


@torch.no_grad()
def _features(adapter: ModelAdapter, batch: Batch, engine: Engine) -> Batch:
    with engine.autocast():
        features = adapter.forward_features(engine.to_device(batch.images))
    return Batch(features.float(), batch.labels, [])


def _train_step(model: Callable[[torch.Tensor], torch.Tensor], optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor, engine: Engine) -> None:
    """What the loop does per batch: forward, backward, an AdamW step (BatchNorm in train mode needs 2 images a batch)."""
    with engine.autocast():
        logits = model(images)
    nn.functional.cross_entropy(logits.float(), labels).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _seconds_per_image(batches: Iterable[Batch], engine: Engine, work: Callable[[torch.Tensor, torch.Tensor], None]) -> float:
    """Mean seconds per image over up to PROBE_BATCHES batches after the first, which is untimed (worker start-up,
    first-call allocations) unless it is the only one: then its time is the estimate, too high rather than too low."""
    iterator, first_seconds, first_count, images = iter(batches), 0.0, 0, 0
    started = time.perf_counter()
    for index, batch in enumerate(iterator):
        work(engine.to_device(batch.images), batch.labels.to(engine.device))
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
        if index == 0:
            first_seconds, first_count = time.perf_counter() - started, len(batch.labels)
            started = time.perf_counter()
        else:
            images += len(batch.labels)
        if index == PROBE_BATCHES:
            break
    if images:
        return (time.perf_counter() - started) / images
    if not first_count:
        raise ThawError("the budget cannot be planned: the data gave no batch to time")
    return first_seconds / first_count
