"""Running a plan: setup, the stages and their epochs, the best epoch kept, a checkpoint every epoch.

Randomness (shuffling, augmentation, dropout) is reseeded from (seed, stage,
epoch) at the start of every epoch, so a run resumed at an epoch boundary
replays exactly what the uninterrupted run would have done.
"""

from __future__ import annotations

import copy
import math
import random
import shlex
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from thaw import distributed
from thaw._allocator import memory_kept_between_steps
from thaw._device import check_device, resolve_device
from thaw._io import NEW_RUN_NOT_WRITABLE, RESUME_NOT_WRITABLE, check_writable
from thaw.data.folders import ImageData, classes_emptied_by_decoding, describe_skipped
from thaw.data.loaders import ImageDataset, configure_threads, cores_per_process, default_workers, make_loader, next_epoch, stop_workers
from thaw.data.pixel_store import SPILL_SUFFIX, PixelStore, SharedPixels
from thaw.data.text import TextData, TextDataset
from thaw.data.transforms import eval_transform, train_transform, train_transform_at
from thaw.distributed import Processes, shard
from thaw.errors import ThawError, first_line
from thaw.models.adapter import ModelAdapter, Preprocessing
from thaw.plan import Plan, enter_stage, plan_to_dict
from thaw.plan.stages import Stage, resolve_stage
from thaw.plan.freeze import apply_trainable, batchnorm_layers, batchnorm_trains, is_eval_locked, locks_statistics, needs_two_images
from thaw.train import checkpoint as ckpt
from thaw.train.run_folder import check_new_run, check_nothing_set_aside, holds_run, restore_run, set_aside_run, training_lock
from thaw.train.adapt_bn import adapt_batchnorm, has_statistics
from thaw.train.config import ONE_IMAGE_BATCHES, TrainConfig, check_image_augments, check_image_size, check_progressive_resize, image_augment_flags
from thaw.train.budget import MARGIN, Split, TopStage, measure_costs, resplit, split_budget, with_epochs
from thaw.train.compiled import CompileFailed, compile_failed, compile_failures, compile_problem, compiled_forward
from thaw.train.ema import require_timm, weight_average
from thaw.train.feature_cache import (
    CACHE_FOLDER, CachedStage, CachingStopped, FeatureBatches, MemoryBudget, build_cache, fingerprint, remove_if_empty,
    remove_spill_files, why_not_cached,
)
from thaw.train.mixing import batch_mixer
from thaw.train.loop import Engine, StageSchedule, decay_advice, evaluate, train_one_epoch, undecodable
from thaw.train.metrics import MetricTracker
from thaw.train.prefix_cache import Entry, check_skipped, disagreement, draws_at_random, head_split_disagreement, find_entry, lowest_trainable_group
from thaw.train.progress import CACHED, FULL, PREFIX, PlanProgress, clock
from thaw.train.resizing import progressive_size
from thaw.train.settings import DATA_CHANGED, class_change, differences, run_settings

BEST_WEIGHTS = "model.safetensors"


@dataclass
class RunState:
    stage: int = 0
    epoch: int = 0  # epochs finished in `stage`
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=dict)
    stale: int = 0  # epochs since the stage last improved the best metric
    stopped: bool = False  # the stage ended early (--early-stopping): a resume moves on to the next stage


@dataclass
class RunResult:
    out: Path
    best: dict
    history: list[dict]
    wall_s: float
    images_per_s: float
    skipped: list[tuple[str, str]]
    engine: Engine | None  # None: a finished run's result read back (resume_run on it), where nothing ran
    plan: Plan  # as run: with --budget, the epochs it chose
    budget: dict | None = None  # with --budget: the split it planned, and where it ended the run early
    cache_s: float = 0.0  # seconds spent computing frozen features (the head phase's one pass)
    decode_s: float = 0.0  # seconds spent decoding every image once, before the first epoch
    decoded: int = 0  # images this process decoded into its pixel store (under torchrun: its share of its machine's)
    held_signal: int | None = None  # Ctrl-C or SIGTERM that came as the run cleaned up: delivered once its files are written


EpochCallback = Callable[[RunState], None]
StepHook = Callable[[torch.optim.Optimizer, int, float], None]  # (optimizer, step, lr multiplier) after every step


class RunInterrupted(Exception):
    """Ctrl-C or SIGTERM: the run stopped where it safely could; the message says whether there is a checkpoint to
    resume. `signal_number` is the signal that asked (the command exits 128 + it: 130, 143)."""

    def __init__(self, message: str, signal_number: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signal_number = int(signal_number)


# What stops a run gracefully (the current step finishes, a checkpoint is saved): Ctrl-C, and the SIGTERM that
# `kill`, `timeout`, `docker stop`, Kubernetes and SLURM send before they kill a process outright.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class InterruptedAfterWriting(KeyboardInterrupt):
    """Ctrl-C held while a finished run's files were written, raised once they were: the run is complete."""


@contextmanager
def signals_held(first: int | None = None) -> Iterator[None]:
    """Ctrl-C or SIGTERM while a finished run's files are written (`first`: one that came before, as the training
    cleaned up): held until every file is written, then delivered with the caller's handlers back. Cut short, the
    run would lose its end; resumed, it would only write them again."""
    held = [first] if first is not None else []
    in_main_thread = threading.current_thread() is threading.main_thread()
    taken = [number for number in STOP_SIGNALS if signal.getsignal(number) is not None] if in_main_thread else []
    previous = {number: signal.signal(number, lambda number, _frame: held.append(number)) for number in taken}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if held:  # only once the files are written: an error while writing stays that error
        try:
            signal.raise_signal(held[0])
        except KeyboardInterrupt:  # the default Ctrl-C handler's: said apart from one that cut the run short
            raise InterruptedAfterWriting from None


def interrupted_before_training(out: Path, when: str | None) -> str:
    """What Ctrl-C outside the training steps leaves: the checkpoint a resumed run had, or nothing to resume.
    `when` None: the stop may have come anywhere (a second Ctrl-C, one while the finished run was written)."""
    if (out / ckpt.CHECKPOINT).exists():
        return f"interrupted{f' {when}' if when else ''}; the checkpoint in {out} is intact: {how_to_continue(out)}"
    if when is None:
        return "interrupted before the run's first checkpoint: nothing to resume; run the same command again"
    return f"interrupted {when}, before training began: nothing to resume; run the same command again"


def how_to_continue(out: Path) -> str:
    """The one way every stop with a checkpoint says to go on: the run's own settings need no other option, but a
    run of several processes resumes with as many, so under torchrun the launcher's command stays."""
    python = f"from Python: resume_run({str(out)!r})"
    if distributed.from_environment().distributed:
        return f"continue with the same torchrun command plus --resume {shlex.quote(str(out))}, without --overwrite ({python})"
    return f"continue with thaw train --resume {shlex.quote(str(out))} ({python})"


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether a run computes in bf16: `auto` means where the device does it natively."""
    if precision != "auto":
        return precision == "bf16"
    return torch.cuda.is_bf16_supported() if device.type == "cuda" else torch.ops.mkldnn._is_mkldnn_bf16_supported()


def choose_engine(config: TrainConfig, model: nn.Module) -> Engine:
    check_device(config.device)  # one this machine has, before the model is moved there
    device = resolve_device(config.device)
    bf16 = uses_bf16(config.precision, device)
    has_conv = any(isinstance(m, nn.Conv2d) for m in model.modules())
    return Engine(device, bf16, config.channels_last and has_conv, quiet=config.quiet, strict=config.strict, label_smoothing=config.label_smoothing)


def effective_preprocessing(adapter: ModelAdapter, config: TrainConfig) -> Preprocessing:
    if config.image_size is None or not isinstance(adapter.preprocessing, Preprocessing):
        return adapter.preprocessing
    pre = adapter.preprocessing
    resize = round(config.image_size * pre.resize_size / pre.crop_size)
    return replace(pre, crop_size=config.image_size, resize_size=resize, source=pre.source + f" at {config.image_size} px")


def _seed_epoch(seed: int, stage: int, epoch: int, rank: int = 0) -> int:
    """Seed this epoch's randomness; returns the shuffling seed, which every rank shares.
    Augmentation is seeded per sample from it (see AugmentationSeeds); dropout draws from the
    global generators, seeded here with a per-rank offset so ranks do not draw the same masks."""
    value = (seed * 1_000_003 + stage * 1_009 + epoch) % (2**31)
    local = (value + rank * 7_919) % (2**31)
    torch.manual_seed(local)
    random.seed(local)
    np.random.seed(local)
    return value


def _is_better(metric: str, value: float, val_loss: float, best: dict) -> bool:
    """Is this epoch the one to deliver? On a small val split accuracy moves by one image and ties are common,
    and the earliest of tied epochs can be the worst model (right after an unfreeze): a tie goes to the lower
    val loss, the measure that still tells tied epochs apart."""
    if not best:
        return True
    if metric == "loss":
        return value < best["value"]
    return value > best["value"] or (value == best["value"] and val_loss < best["val"]["loss"])


def split_check_noise(size: int) -> torch.Tensor:
    """The two seeded images of noise the head split is checked on (Trainer.noise_images), on the CPU."""
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


def data_line(data: ImageData | TextData) -> str:
    """The run's first line: how the data was read (which folder is val, or what share was held out) and the counts,
    so a layout thaw read otherwise than the user meant shows before any training."""
    test = f", {len(data.test)} test" if data.test else ""
    return f"data: {data.layout}; {len(data.classes)} classes, {len(data.train)} train, {len(data.val)} val{test}"


TIES_LISTED = 5  # a long run on a small val split can tie in hundreds of epochs: the line stays one line
SMALL_SIZE_SHARE = 4  # an image size at or below 1/4 of the weights' own is warned of (a 224 px network shown 56 px or less)


def why_delivered(best: dict, history: list[dict]) -> str:
    """One line for the run summary: the epoch delivered, and how ties were settled."""
    metric, value = best["metric"], best["value"]
    if metric == "loss":
        return f"lowest val loss {value:.4f}"
    tied = [row["epoch"] for row in history if row.get(f"val_{metric}") == value and row["epoch"] != best["epoch"]]
    said = f"highest val {metric} {value:.4f}"
    if tied:
        listed = ", ".join(map(str, tied[:TIES_LISTED])) + (f" and {len(tied) - TIES_LISTED} more" if len(tied) > TIES_LISTED else "")
        said += f", tied with epoch{'s' if len(tied) > 1 else ''} {listed}: the lowest val loss of them"
    return said


def outcomes(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a logger keeps of one val batch: each sample's predicted class, loss and label."""
    return logits.argmax(dim=1), nn.functional.cross_entropy(logits, labels, reduction="none"), labels


class Trainer:
    """Holds what one run needs; `fit` is the only public entry."""

    def __init__(
        self, adapter: ModelAdapter, data: ImageData | TextData, plan: Plan, config: TrainConfig, out: Path, meta: dict,
        processes: Processes = distributed.SINGLE,
    ):
        self.began = time.perf_counter()  # a --budget counts from here: data and model are ready
        self.adapter, self.data, self.plan, self.config, self.out, self.meta = adapter, data, plan, config, out, meta
        self.requested_plan = plan  # what the run records and a resume compares; --budget may change self.plan's epochs
        self.processes = processes
        self.model = adapter.model
        # The current stage's forward where it is not the model's own: a DDP wrapper (several processes), compiled (--compile).
        self.wrapped: Callable[..., torch.Tensor] | None = None
        self.engine = choose_engine(config, self.model)
        self.engine.distributed, self.engine.world = processes.distributed, processes.world
        self.model.to(self.engine.device)
        if self.engine.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.preprocessing = effective_preprocessing(adapter, config)
        self.draft_size = 0  # images only: JPEGs decode at reduced scale, no smaller than this
        self.workers = default_workers() if config.workers is None else config.workers
        configure_threads(self.workers)
        self.store: PixelStore | None = None  # every image decoded once, for every epoch and view (filled when the run starts)
        if isinstance(data, ImageData):
            self.draft_size = 2 * self.preprocessing.resize_size
            spill = out / CACHE_FOLDER / f"pixels-rank{processes.rank}{SPILL_SUFFIX}"
            budget = int(config.decoded_memory_gb * 2**30)
            self.store = PixelStore(self.draft_size, budget, spill)
        self.text_sets: dict[str, TextDataset] = {}
        self.train_set = self.dataset("train" if config.augment else "train-eval")
        self.persistent_train_loader: DataLoader | None = None  # see epoch_loader()
        self.pin = self.engine.device.type == "cuda"  # page-locked batches: the copy to the GPU overlaps compute
        self.val_loader = make_loader(
            self.dataset("val"), batch_size=config.batch_size, shuffle=False, seed=config.seed, workers=self.workers, processes=processes,
            pin_memory=self.pin, persistent=True,  # the same fixed order every epoch; its workers live for the run
        )
        self.cached: CachedStage | None = None
        self.keep_cache = False  # the current stage cached where the next stage enters: its features outlive it
        self.entry_sample: tuple[torch.Tensor | None] | None = None  # see sample_images()
        self.head_split: tuple[str | None] | None = None  # see head_split_refusal()
        self.cache_seconds = 0.0  # building feature caches, over the run (benchmarks/throughput.py reads it)
        self.decode_seconds = 0.0  # decoding every image once into the pixel store
        self.budget_split: Split | None = None  # with --budget: the epochs chosen and the time expected per part
        self.deadline: float | None = None  # with --budget: no epoch starts that would end after it
        self.budget_ended: str | None = None  # where the budget ended the run before its plan did
        self.epoch_wall: dict[int, float] = {}  # per stage: seconds of its last epoch, checkpoint included (--budget)
        self.restored = False  # continued from a checkpoint
        self.replaces_run = False  # a new run in a folder that holds another (--overwrite): set aside as training begins,
        self.set_aside: Path | None = None  # and deleted at the first checkpoint; put back if the run ends before it
        if config.ema:
            require_timm()
        self.ema: nn.Module | None = None  # the weight average of the current stage (--ema, stages that train pretrained layers)
        self.engine.step_hooks.append(self._update_ema)
        self.optimizer: torch.optim.Optimizer | None = None
        self.stop_requested = False
        self.stopped_by: int = signal.SIGINT  # the signal that asked the run to stop
        self.held_signal: int | None = None  # one that came during the clean-up: raised again once it is done
        self.cleaning = False
        self.warned_failures: list[tuple[str, str]] = []  # files found unreadable while decoding, already said
        self.resume_point: dict | None = None  # where a run interrupted mid-epoch stopped
        self.state = RunState()
        self.train_images, self.train_seconds = 0, 0.0
        # a logger that asks gets each val sample's (prediction, loss, label): O(samples), not the logits' O(samples x classes)
        self.val_outputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
        self.settings = run_settings(config, data, meta, plan_to_dict(plan), bf16=self.engine.bf16, processes=processes.world)
        self.cache_budget = MemoryBudget(int(config.cache_memory_gb * 2**30))
        # Without augmentation every cached view would be the evaluation view: cache that one only.
        self.views = config.cache_views if config.augment else 0
        if config.cache_views and not config.augment:
            self._say(f"--cache-views {config.cache_views} ignored: with --no-augment the evaluation view is cached once")
        # mixup and cutmix blend the images a stage runs the network on: stages on cached features train on them unblended
        self.mixer = batch_mixer(len(data.classes), config.mixup, config.cutmix) if isinstance(data, ImageData) else None
        if config.progressive_resize is not None and config.budget is None and not self.resizes():
            self._say("--progressive-resize changes nothing here: no stage is expected to run the whole network for more than "
                      "one epoch (stages on cached inputs train at the full size)")
        self._say_unused_augments()
        self._warn_small_image_size()

    def _warn_small_image_size(self) -> None:
        """Pretrained weights shown images a quarter of their size or less see few of the patterns they learned: a 1 px
        run trains without an error, at chance. Random weights (none) learned no size, and a file's size is not known
        (a thaw run's may have been trained at this one)."""
        size, crop = self.config.image_size, self.adapter.preprocessing.crop_size if isinstance(self.data, ImageData) else None
        weights = self.meta.get("weights")
        if size is None or crop is None or weights is None or Path(weights).is_file() or size * SMALL_SIZE_SHARE > crop:
            return
        self._warn(
            f"image size {size} px is a quarter or less of the {crop} px the {weights} weights "
            "were trained at; their features see little at that size: a larger --image-size enlarges small images"
        )

    def _say_unused_augments(self) -> None:
        """Augmentations that no stage of this plan would see: every stage trains on cached features."""
        if FULL in self._predicted_kinds() or not isinstance(self.data, ImageData):
            return
        unused = [flag for flag in image_augment_flags(self.config) if not flag.startswith("auto_augment") or not self.views]
        if unused:
            verb = "change" if len(unused) > 1 else "changes"
            # with views the policy drew them; mixing is never applied to cached features
            what = "cached features, which are not mixed" if self.views else "cached features of the evaluation view"
            hint = "" if self.views else "--cache-views K caches augmented views; "
            self._say(f"{', '.join(unused)} {verb} nothing here: every stage trains on {what} ({hint}--no-cache trains on the images)")

    def resizes(self) -> bool:
        """Whether --progressive-resize shrinks some epoch of this plan: a stage that runs the network on images for
        more than one epoch (a stage on cached features trains on full-size views)."""
        full = [stage for stage, kind in zip(self.plan.stages, self._predicted_kinds()) if kind == FULL]
        return isinstance(self.data, ImageData) and any(stage.epochs > 1 for stage in full)

    def dataset(self, kind: str) -> ImageDataset | TextDataset:
        """train (augmented), train-eval (the evaluation view of train) or val."""
        if isinstance(self.data, TextData):  # text is not augmented: train and train-eval are one dataset
            split = "val" if kind == "val" else "train"
            if split not in self.text_sets:
                self.text_sets[split] = TextDataset(self.data.split(split), self.adapter.tokenizer, self.preprocessing.max_length)
            return self.text_sets[split]
        augmented = kind == "train"
        policy = self.config.auto_augment
        transform = train_transform(self.preprocessing, policy) if augmented else eval_transform(self.preprocessing)
        samples = self.data.val if kind == "val" else self.data.train
        transform_at = partial(train_transform_at, self.preprocessing, auto_augment=policy) if augmented else None  # progressive resizing
        return ImageDataset(samples, transform, self.draft_size, self.store, transform_at)

    def stage_cache(self, stage_index: int) -> CachedStage | None:
        """The cached features this stage trains on (the head's input, or the frozen bottom's output where only
        the top groups train), computed when missing; None when not exact here."""
        trainable = tuple(n for n, p in self.model.named_parameters() if p.requires_grad)
        reason = why_not_cached(self.adapter, trainable) if self.config.cache else "--no-cache"
        entry = None
        head_only = all(self.adapter.in_head(name) for name in trainable)
        if not reason and head_only and isinstance(self.data, ImageData):
            reason = self.head_split_refusal(now=True)
        if reason and self.config.cache and trainable and not head_only:  # a head stage keeps its own reason
            found = self.prefix_entry(trainable, self.batchnorm_updates())
            entry, reason = (found, None) if isinstance(found, Entry) else (None, found)
        name = self.plan.stages[stage_index].name
        if reason:
            self.release_cache()  # an earlier stage's features: this stage runs the network
            if len(trainable) < len(list(self.model.parameters())):
                self._say(f"stage {name!r}: frozen-feature cache off ({reason})")
            return None
        if entry is None:  # a head stage: where the next stage enters lower, one pass serves both
            entry = self.shared_entry(stage_index, trainable)
            self.keep_cache = entry is not None
        views = min(self.views, self.plan.stages[stage_index].epochs)  # a view past the stage's last epoch is never used
        key = fingerprint(self.adapter, trainable, self.preprocessing, self.data.train + self.data.val, f"views={views} seed={self.config.seed}", entry)
        if self.cached is not None and self.cached.key == key:
            what = f"the output of the frozen layers below {entry.boundary}" if entry else "the frozen features"
            self._say(f"stage {name!r}: trains on {what} cached in the stage before")
        else:
            self.release_cache()  # what the frozen part computed before no longer holds
            started = time.perf_counter()
            try:
                self.cached = build_cache(
                    self.adapter, key, self.dataset, views, self.engine, batch_size=self.config.batch_size,
                    workers=self.workers, budget=self.cache_budget, folder=self.out / CACHE_FOLDER, seed=self.config.seed,
                    processes=self.processes, entry=entry, should_stop=lambda: self.stop_requested,
                )
            except CachingStopped:  # the pass is not worth finishing: nothing it computed is kept or checkpointed
                remove_if_empty(self.out / CACHE_FOLDER)
                said = interrupted_before_training(self.out, f"while caching features for stage {name!r}")
                raise RunInterrupted(said, self.stopped_by) from None
            counts = f"{len(self.cached.train_views[0].labels)} train x {max(1, views)} view(s), {len(self.cached.val.labels)} val"
            if self.processes.distributed:
                counts += f" on rank 0 of {self.processes.world}, each rank caching its shard"
            took = time.perf_counter() - started
            self.cache_seconds += took
            what = f"the frozen layers below {entry.boundary} ran" if entry else "frozen features cached"
            self._say(f"stage {name!r}: {what} once ({counts}) in {took:.1f} s")
        if not head_only and not views and self.config.augment:
            self._say(f"stage {name!r}: the top trains on the evaluation view, not a new random crop each epoch "
                      "(--cache-views K caches K augmented views; --no-prefix-cache trains it on the images)")
        return self.cached

    def head_split_refusal(self, now: bool = False) -> str | None:
        """Why the head cannot train on cached features though only it trains: the model's forward does more than
        its head on the features (checked on noise_images). Rank 0 decides for every rank. The stage predictions read
        the answer of the first check; `now` checks again, on the weights as they are when a head stage starts
        (an earlier stage or a resume may have changed a learned scale after the head), as stage_cache does on every
        rank alike."""
        if self.head_split is None or now:
            found = None
            if self.processes.is_main:
                found = head_split_disagreement(self.adapter, self.noise_images(), self.engine)
            if self.processes.distributed:
                found = distributed.broadcast(found)
            self.head_split = (found,)
        return self.head_split[0]

    def noise_images(self) -> torch.Tensor:
        """Two seeded images of noise at the run's size, on the device: what the head split is checked on. Whether the
        head alone gives the model's logits is the forward's arithmetic, not the images'; and decoding val images for it
        as the run is set up decoded them twice (the run decodes each image once)."""
        return self.engine.to_device(split_check_noise(self.preprocessing.crop_size))

    def shared_entry(self, stage_index: int, trainable: tuple[str, ...]) -> Entry | None:
        """For a head stage: the next stage's entry, where this stage can take its features there too, so one pass
        of the frozen bottom serves both (gradual: the head stage caches what the top-2 stage trains on). Decided by
        the plan alone, so a resumed run caches where the uninterrupted one did. The next stage checks the entry
        again under its own BatchNorm policy, and recomputes if it differs."""
        stages = self.plan.stages
        if stage_index + 1 >= len(stages) or not stages[stage_index + 1].epochs:
            return None
        if min(self.views, stages[stage_index + 1].epochs) != min(self.views, stages[stage_index].epochs):
            return None  # other views: nothing to share
        if not self._stages_may_share(stage_index, trainable):
            return None
        later = resolve_stage(self.adapter, stages[stage_index + 1]).trainable
        # under the next stage's BatchNorm policy, which decides whether that stage may train on cached inputs
        found = self.prefix_entry(tuple(later), self._statistics_move(stages[stage_index + 1], set(later)))
        if not isinstance(found, Entry):
            return None
        shareable: bool | None = None
        if self.processes.is_main:
            shareable = self._head_can_share(trainable, found, self.adapter)
        if self.processes.distributed:
            shareable = distributed.broadcast(shareable)
        return found if shareable else None

    def _stages_may_share(self, stage_index: int, trainable: tuple[str, ...]) -> bool:
        """shared_entry's rules on the two stages' plans: the next one's BatchNorm statistics stay as they are (else
        its bottom would differ), and it trains what this one (`trainable`) does, and more (gradual)."""
        stages = self.plan.stages
        if stages[stage_index + 1].batchnorm in ("train", "adapt"):
            return False
        try:
            later = resolve_stage(self.adapter, stages[stage_index + 1]).trainable
        except ThawError:  # the next stage reports its own problem when it starts
            return False
        return set(trainable) <= set(later)

    def _head_can_share(self, trainable: tuple[str, ...], entry: Entry, adapter: ModelAdapter) -> bool:
        """shared_entry's rules on the network, with `adapter` locked as the head stage runs (`trainable`): its BatchNorm
        layers outside the top are eval-locked, and the frozen layers between the entry and the head, which run in
        train mode there, draw nothing at random (dropout, stochastic depth), so the head trains on fixed features."""
        if not isinstance(check_skipped(adapter.model, trainable, entry), Entry):
            return False
        head = adapter.model.get_submodule(self.adapter.group("head").modules[0])
        return not draws_at_random(adapter.model, entry, head, self.sample_images(), self.engine)

    def prefix_refusal(self, trainable: tuple[str, ...], batchnorm_updates: bool) -> str | None:
        """Why a stage that trains these parameters (not only the head) cannot train on the frozen bottom's cached
        output, known before the network runs; None: it may (the entry is then found and checked on the network).
        Options that change the images every epoch keep it on the images."""
        c = self.config
        if not c.cache_prefix:
            return "--no-prefix-cache"
        if not isinstance(self.data, ImageData):
            return "a text stage that trains layers below the head runs on the tokens"
        if self.mixer is not None:
            return "--mixup and --cutmix blend the images this stage trains on"
        if c.auto_augment and not self.views:
            return "--auto-augment changes the images every epoch (--cache-views K caches K augmented views)"
        if lowest_trainable_group(self.adapter, trainable) == 0:
            return "the lowest layer group trains"
        if self.processes.distributed and batchnorm_updates:  # DDP keeps their statistics in step; cached stages do not run through it
            return "under torchrun, BatchNorm statistics that update need the network to run through DDP"
        return None

    def prefix_entry(self, trainable: tuple[str, ...], statistics_move: bool) -> Entry | str:
        """Where a stage that trains only the top groups (BatchNorm statistics moving in it or not) enters the network
        over cached inputs, or why it trains on the images. Rank 0 decides for every rank."""
        refused = self.prefix_refusal(trainable, statistics_move)
        if refused:
            return refused
        found: Entry | str | None = None
        if self.processes.is_main:
            found = self._find_entry(trainable)
        if self.processes.distributed:
            found = distributed.broadcast(found)
        return found

    def sample_images(self) -> torch.Tensor | None:
        """A few val images (evaluation view) on the device: what entries are checked on; decoded once per run."""
        if self.entry_sample is None:
            sample = make_loader(self.dataset("val"), batch_size=min(self.config.batch_size, 8), shuffle=False, seed=0, workers=0)
            batch = next((batch for batch in sample if len(batch.labels)), None)
            self.entry_sample = (None if batch is None else self.engine.to_device(batch.images),)
        return self.entry_sample[0]

    def _find_entry(self, trainable: tuple[str, ...], adapter: ModelAdapter | None = None) -> Entry | str:
        """The entry of a stage that trains `trainable`, checked on `adapter` (default: the run's, as it is now)."""
        adapter = adapter or self.adapter
        images = self.sample_images()
        if images is None:
            return "no val image decodes to check the entry against"
        found = find_entry(adapter, trainable, images, self.engine)
        if isinstance(found, Entry):
            return disagreement(adapter.model, found, images, self.engine) or found
        return found

    def fill_store(self) -> None:
        """Decode every train image and this rank's val images once, before the first epoch, where some image
        would otherwise be decoded more than once: later epochs, views and workers read pixels. Decoding uses
        every core of this process's share (it is all there is to do), or --workers processes where given.
        Under torchrun the processes on a machine split the train images between them (see share_train_pixels)."""
        if self.store is None or not self.reads_images_again():
            return  # the one pass (a cached head stage) decodes each file itself: the same pixels, no store to hold
        started = time.perf_counter()
        val = [self.data.val[index][0] for index in shard(len(self.data.val), self.processes, pad=False)]
        train = [path for path, _ in self.data.train]
        decoders = self.config.workers if self.config.workers is not None else (cores_per_process() if cores_per_process() > 1 else 0)
        peers = distributed.machine_peers() if self.processes.distributed else [self.processes.rank]
        shared_bytes, sharing = self.share_train_pixels(train, peers, decoders) if len(peers) > 1 else (0, 1)
        own_share = self.store.spilled  # this rank's part of the machine's files; what spills from here on is its own
        if not self.store.fill(train + val, decoders, should_stop=lambda: self.stop_requested):
            raise RunInterrupted(interrupted_before_training(self.out, "while decoding images"), self.stopped_by)
        self.decode_seconds = time.perf_counter() - started
        where = f"{self.store.used / 2**20:.0f} MB in memory"
        if shared_bytes:
            readers = f", one copy for {sharing} processes on this machine" if sharing > 1 else ""
            where = f"{shared_bytes / 2**20:.0f} MB in the run folder{readers}; rank 0: {where}"
        if self.store.spilled > own_share:
            where += f", {(self.store.spilled - own_share) / 2**20:.0f} MB on disk past the {self.config.decoded_memory_gb:g} GB budget"
        self._say(f"decoded {len(train) + len(val)} images once ({where}) in {self.decode_seconds:.1f} s")

    def share_train_pixels(self, paths: list[Path], peers: list[int], decoders: int) -> tuple[int, int]:
        """Several processes on one machine: this one decodes its share of the train images into its file in the run
        folder and reads the others' files, so each image is decoded once per machine and its pixels are held once (in
        the page cache). A rank that fails here tells the others, and every rank stops with its reason. (Nothing waits
        for Ctrl-C: under torchrun no rank handles it, torchrun stops them all.) Returns the bytes of the machine's
        files this rank reads and the number of processes whose files it reads, itself included."""
        share = list(dict.fromkeys(paths))[peers.index(self.processes.rank) :: len(peers)]
        try:
            self.store.fill(share, decoders, to_disk=True)
            report: SharedPixels | str = self.store.shared()
        except ThawError as error:
            report = str(error)
        reports = distributed.gather_objects(report)
        for rank, said in enumerate(reports):
            if isinstance(said, str):
                raise ThawError(said if rank == self.processes.rank else f"rank {rank} could not decode its share of the images: {said}")
        read = [reports[rank] for rank in peers if rank != self.processes.rank and self.store.adopt(reports[rank])]
        return report.size + sum(pixels.size for pixels in read), 1 + sum(1 for pixels in read if pixels.size)

    def reads_images_again(self) -> bool:
        """Whether the rest of the run reads some image more than once: a stage that runs the network on images
        every epoch, several cached views, or a BatchNorm adapt pass besides the cache's. A stage predicted to train
        its top on the cached bottom counts too: its entry check may still send it to the images, and where the
        stage before does not share its entry it makes a pass of its own."""
        remaining = self.plan.stages[self.state.stage :]
        kinds = [self._predicted_kind(stage) for stage in remaining]
        return any(kind != CACHED for kind in kinds) or self.views > 1 or any(stage.batchnorm == "adapt" for stage in remaining)

    def release_cache(self) -> None:
        """Drop the cached features, give their memory back to the run's budget and delete their spill files."""
        if self.cached is not None:
            self.cached.release()
            self.cached = None
            remove_if_empty(self.out / CACHE_FOLDER)

    def batchnorm_updates(self) -> bool:
        """Whether some BatchNorm layer (or InstanceNorm that tracks statistics, held as BatchNorm is) normalises with
        batch statistics in this stage (policy train)."""
        return any(not is_eval_locked(layer) for _, layer in batchnorm_layers(self.model))

    def steps_per_epoch(self, cached: CachedStage | None = None) -> int:
        """Optimizer steps in one epoch of this rank (every rank takes as many)."""
        if cached is not None:
            batches = math.ceil(len(cached.train_view(0).labels) / self.config.batch_size)
        else:
            loader = make_loader(self.train_set, batch_size=self.config.batch_size, shuffle=True, seed=0, workers=0, processes=self.processes)
            batches = len(loader)
        return math.ceil(batches / self.config.accumulate)

    def _schedule(self, epochs: int, cached: CachedStage | None) -> StageSchedule:
        per_epoch = self.steps_per_epoch(cached)
        c = self.config
        return StageSchedule(c.schedule, per_epoch, per_epoch * epochs, c.warmup, c.grad_clip, c.accumulate)

    def _checkpoint_state(self) -> dict:
        return {
            "format": 1,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "stage": self.state.stage,
            "epoch": self.state.epoch,
            "history": self.state.history,
            "best": self.state.best,
            "stale": self.state.stale,
            "stopped": self.state.stopped,
            "plan": plan_to_dict(self.requested_plan),
            "budget": self.budget_split.to_dict() if self.budget_split else None,
            "classes": list(self.data.classes),
            "model_name": self.meta["model"],
            "settings": self.settings,
            "data_path": self.meta.get("data_path"),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
        }

    def restore(self) -> None:
        saved = ckpt.load_checkpoint(self.out / ckpt.CHECKPOINT) if self.processes.is_main else None
        if self.processes.distributed:  # rank 0 reads it; every rank continues from the same state
            saved = distributed.broadcast(saved)
        if saved.get("classes") != list(self.data.classes):
            then = list(saved.get("classes", []))
            raise ThawError(
                f"the run in {self.out} was trained on {len(then)} classes ({', '.join(then[:5])}{', ...' if len(then) > 5 else ''}), "
                f"this data has {len(self.data.classes)} ({class_change(then, list(self.data.classes))}); "
                "resume with the same data, or start a new run with another --out"
            )
        changed = differences(saved["settings"], self.settings) if "settings" in saved else []
        if saved.get("plan") != plan_to_dict(self.plan) or saved.get("model_name") != self.meta["model"]:
            changed = changed or ["the model or the plan"]
        if changed:
            # Where the data changed, the run's own settings would read the same changed data: that advice would fail too.
            advice = (
                "Put the data back as the run had it, or start a new run on this data with another --out"
                if DATA_CHANGED in changed else
                f"Resume with the run's own settings: `thaw train --resume {shlex.quote(str(self.out))}` (resume_run({str(self.out)!r}) from Python) "
                "reads them from the run"
            )
            raise ThawError(f"the run in {self.out} was started with other settings; different now: {'; '.join(changed)}. {advice}")
        try:
            self.model.load_state_dict(saved["model"])
        except RuntimeError as error:  # a model object of the same class but another size, say
            raise ThawError(f"the checkpoint in {self.out} does not fit this model ({first_line(error)}); pass the run's architecture") from None
        self.restored = True
        if saved.get("budget"):  # the epochs the budget chose when the run started
            self.budget_split = Split.from_dict(saved["budget"])
            self.plan = with_epochs(self.requested_plan, self.budget_split.epochs)
        self.state = RunState(
            saved["stage"], saved["epoch"], saved["history"], saved["best"], saved.get("stale", 0), saved.get("stopped", False)
        )
        if saved.get("batch"):
            self.resume_point = {key: saved.get(key) for key in ("batch", "rng", "cuda_rng", "tracker")}
        _, self.optimizer = self._enter(self.state.stage, None)
        try:
            self.optimizer.load_state_dict(saved["optimizer"])
        except ValueError as error:  # torch's "different number of parameter groups": the model's groups changed since
            # the checkpoint (a torchvision ViT, 3 groups before thaw grouped it by its encoder layers)
            raise ThawError(
                f"the checkpoint in {self.out} holds an optimizer for other layer groups than this model has now "
                f"({first_line(error)}); the run cannot continue: start it again (--overwrite)"
            ) from None
        if saved.get("ema") is not None:  # the average so far: restarting it from the restored weights would change the run
            self.ema = weight_average(self.model)
            self.ema.module.load_state_dict(saved["ema"])

    def _resume_mid_epoch(self) -> tuple[int, MetricTracker]:
        """Batches already done in this epoch, and its metrics so far; the RNG continues where it stopped."""
        tracker = MetricTracker(len(self.data.classes))
        point, self.resume_point = self.resume_point, None
        if point is None:
            return 0, tracker
        torch.set_rng_state(point["rng"])
        if point["cuda_rng"] is not None and self.engine.device.type == "cuda":  # dropout on the GPU draws from its own generator
            torch.cuda.set_rng_state(point["cuda_rng"], self.engine.device)
        tracker.restore(point["tracker"])
        return point["batch"], tracker

    def crop_size(self, stage_index: int, epoch: int) -> int | None:
        """This full-network epoch's crop size under --progressive-resize; None: the full size."""
        start = self.config.progressive_resize
        if start is None or not isinstance(self.data, ImageData):
            return None
        final = self.preprocessing.crop_size
        size = progressive_size(final, start, epoch, self.plan.stages[stage_index].epochs)
        return None if size == final else size

    def pixels(self, stage_index: int, epoch: int) -> int:
        """Pixels of one crop in this epoch of a stage that runs the network on images (else 1: text, and cached
        features, computed at the full size): a train step's compute grows with them."""
        cached = self.engine.progress is not None and self.engine.progress.kinds[stage_index] in (CACHED, PREFIX)
        if cached or not isinstance(self.data, ImageData):
            return 1
        return (self.crop_size(stage_index, max(epoch, 0)) or self.preprocessing.crop_size) ** 2

    def epoch_loader(self, seed: int, skip_batches: int, size: int | None = None) -> DataLoader:
        """This epoch's training batches (images: crops of `size` px where given). Images: one loader for the run,
        so its worker processes live on."""
        options = {"batch_size": self.config.batch_size, "workers": self.workers, "processes": self.processes, "pin_memory": self.pin}
        if isinstance(self.train_set, TextDataset):  # tokenised up front and batched by length, in this process
            return make_loader(self.train_set, shuffle=True, seed=seed, skip_batches=skip_batches, **options)
        if self.persistent_train_loader is None:
            self.persistent_train_loader = make_loader(self.train_set, shuffle=True, seed=seed, persistent=True, **options)
        return next_epoch(self.persistent_train_loader, seed, skip_batches, self.processes, size)

    def run_epoch(self, stage_index: int, schedule: StageSchedule, cached: CachedStage | None) -> dict:
        stage, state, classes = self.plan.stages[stage_index], self.state, len(self.data.classes)
        seed = _seed_epoch(self.config.seed, stage_index, state.epoch, self.processes.rank)
        done, tracker = self._resume_mid_epoch()
        label = f"{stage.name} {state.epoch + 1}/{stage.epochs}"
        first_step = state.epoch * schedule.steps_per_epoch + done // schedule.accumulate
        options = {"tracker": tracker, "should_stop": lambda: self.stop_requested}
        if cached is None:
            size = self.crop_size(stage_index, state.epoch)
            label += f" at {size} px" if size else ""
            loader = self.epoch_loader(seed, done, size)
            mix = None if self.mixer is None else self.mixer.for_epoch(seed, first_batch=done, rank=self.processes.rank)
            train = train_one_epoch(self.model, loader, self.optimizer, self.engine, schedule, first_step, label, classes,
                                    forward=self.wrapped, mix=mix, **options)
        else:
            # The head gets what the live network would hand it; the boundary of an entry gets its input as computed
            # (under autocast a LayerNorm's output stays fp32).
            dtype = None if cached.entry else (torch.bfloat16 if self.engine.bf16 else torch.float32)
            features = FeatureBatches(cached.train_view(state.epoch), self.config.batch_size, seed, dtype, skip_batches=done)
            forward = cached.forward(self.adapter, self.model)
            train = train_one_epoch(self.model, features, self.optimizer, self.engine, schedule, first_step, label, classes, forward=forward, **options)
        if train["interrupted"]:
            self._save_interrupted(done + train["batches"], train["tracker"])
        observe = None
        if self.val_outputs is not None:
            self.val_outputs.clear()
            observe = lambda logits, labels: self.val_outputs.append(outcomes(logits, labels))  # noqa: E731
        if cached is None:  # with --ema, val (and so the delivered epoch) is measured on the average
            val = evaluate(self.delivered_model(), self.val_loader, self.engine, classes, label=f"{label} val", observe=observe)
        else:
            batches = FeatureBatches(cached.val, self.config.batch_size, None, dtype)
            model = self.delivered_model()  # the weight average, where a stage that trains layers keeps one
            val = evaluate(model, batches, self.engine, classes, f"{label} val", forward=cached.forward(self.adapter, model), observe=observe)
        self.train_images += train["images"]
        self.train_seconds += train["seconds"]
        return self._record(stage_index, train, val, cached is not None)

    def _save_interrupted(self, batches: int, tracker: MetricTracker) -> None:
        cuda_rng = torch.cuda.get_rng_state(self.engine.device) if self.engine.device.type == "cuda" else None
        state = self._checkpoint_state() | {"batch": batches, "rng": torch.get_rng_state(), "cuda_rng": cuda_rng, "tracker": tracker.state()}
        self._save_checkpoint(state)
        stage = self.plan.stages[self.state.stage]
        where = f"in stage {stage.name!r}, epoch {self.state.epoch + 1}, after batch {batches}"
        raise RunInterrupted(self._stopped_with_checkpoint(where), self.stopped_by)

    def _stopped_with_checkpoint(self, where: str) -> str:
        return f"interrupted {where}; a checkpoint is saved: {how_to_continue(self.out)}"

    def _check_weights_finite(self, stage_index: int) -> None:
        """Before anything is written: a finite loss does not prove finite weights (taps that never
        touch the input can turn NaN unseen; seen with bf16 channels_last depthwise convolutions on CPU)."""
        bad = [n for n, p in self.model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
        if bad:
            stage = self.plan.stages[stage_index]
            raise ThawError(
                f"{len(bad)} trainable tensors hold NaN or inf after stage {stage.name!r} epoch {self.state.epoch + 1} "
                f"(first: {bad[0]}); nothing was written and the last checkpoint is kept. Lower the lr, or try "
                "precision 'fp32' (--precision fp32) or channels_last=False (--no-channels-last), or a larger image_size (--image-size)"
                + (decay_advice(self.optimizer) if self.optimizer is not None else "")
            )

    def _record(self, stage_index: int, train: dict, val: dict, cached: bool) -> dict:
        stage, state = self.plan.stages[stage_index], self.state
        self._check_weights_finite(stage_index)
        row = {
            "epoch": len(state.history) + 1,
            "stage": stage.name,
            "stage_index": stage_index,
            "stage_epoch": state.epoch + 1,
            "train_loss": train["loss"],
            "train_accuracy": train["accuracy"],
            "val_loss": val["loss"],
            "val_accuracy": val["accuracy"],
            "val_macro_f1": val["macro_f1"],
            "val_top5": val.get("top5"),
            "images_per_s": train["images"] / max(train["seconds"], 1e-9),  # a resumed epoch: its resumed part
            "seconds": train["seconds"] + val["seconds"],
            "cached": cached,
            "data_wait_share": None if cached else train["data_wait_share"],  # features in memory: no loading to wait for
        }
        state.history.append(row)
        value = val["loss"] if self.config.metric == "loss" else val[self.config.metric]
        if _is_better(self.config.metric, value, val["loss"], state.best):
            state.best = {"metric": self.config.metric, "value": value, "epoch": row["epoch"], "stage": stage.name, "val": {k: v for k, v in val.items() if k != "seconds"}}
            state.stale = 0
            if self.processes.is_main:
                ckpt.save_weights(self.out / BEST_WEIGHTS, self.delivered_model(), self.data.classes)
        else:
            state.stale += 1
        state.best["why"] = why_delivered(state.best, state.history)  # a later tie with a higher loss changes only the reason
        return row

    def _save_checkpoint(self, state: dict) -> None:
        if self.processes.is_main:
            ckpt.save_checkpoint(self.out / ckpt.CHECKPOINT, state)
        if self.set_aside is not None:  # the new run can be resumed now: the run it replaces goes
            aside, self.set_aside = self.set_aside, None  # first: whatever happens below, the new run is the one kept
            try:
                shutil.rmtree(aside)
            except OSError as error:
                print(f"thaw: warning: could not delete the replaced run in {aside} ({first_line(error)}); delete it by hand",
                      file=sys.stderr, flush=True)

    def _enter(self, stage_index: int, optimizer: torch.optim.Optimizer | None) -> tuple[object, torch.optim.Optimizer]:
        """enter_stage, then (several processes) a new DDP wrapper over exactly what trains now."""
        stage = self.plan.stages[stage_index]
        resolved, optimizer = enter_stage(self.adapter, stage, optimizer, self.config.optimizer)
        self.engine.audit_next_step = f"the first step of stage {stage.name!r}"
        self.engine.min_batch = 2 if needs_two_images(self.model) else 1
        if self.engine.min_batch > self.config.batch_size:
            raise ThawError(f"stage {stage.name!r}: {ONE_IMAGE_BATCHES}")  # check_batch_statistics refuses it before any work
        self.wrapped = None
        if self.processes.distributed:
            self.wrapped = distributed.wrap(self.model, self.engine.device)
        if self.config.compile:  # compiles lazily: a stage on cached features never calls it
            self.wrapped = compiled_forward(self.wrapped or self.model)
        return resolved, optimizer

    def plan_progress(self) -> PlanProgress:
        """The plan as the bar counts it: epochs per stage (stages that ended early cut to what they ran),
        and which stages will train on cached features (predicted: only the head trains; the stage decides)."""
        epochs = [stage.epochs for stage in self.plan.stages]
        for index in range(self.state.stage + self.state.stopped):
            epochs[index] = sum(1 for row in self.state.history if row["stage_index"] == index)
        unit = "texts" if isinstance(self.data, TextData) else "img"
        return PlanProgress(epochs, [self._predicted_kind(stage) for stage in self.plan.stages], self.steps_per_epoch(), unit=unit)

    def _predicted_kind(self, stage: Stage) -> str:
        try:
            trainable = resolve_stage(self.adapter, stage).trainable
        except ThawError:  # the stage reports its own problem when it starts, as it always has
            return FULL
        head_only = all(self.adapter.in_head(name) for name in trainable)
        if not self.config.cache:
            return FULL
        if head_only:  # policy train: BatchNorm statistics move every step, so the features cannot be cached (why_not_cached)
            if stage.batchnorm == "train" or (isinstance(self.data, ImageData) and self.head_split_refusal()):
                return FULL
            return CACHED
        # The stage itself checks its entry on the network, and may still fall back to the images.
        return FULL if self.prefix_refusal(trainable, self._statistics_move(stage, set(trainable))) else PREFIX

    def _statistics_move(self, stage: Stage, trainable: set[str]) -> bool:
        """Whether some BatchNorm layer will normalise with batch statistics in this stage (before it is entered)."""
        layers = batchnorm_layers(self.model)
        return any(not locks_statistics(stage.batchnorm, batchnorm_trains(self.adapter, name, layer, trainable)) for name, layer in layers)

    def run_stage(self, stage_index: int, callbacks: list[EpochCallback]) -> None:
        if stage_index and self.state.epoch == 0 and self.budget_split is not None and not self.restored:
            self.replan_budget(stage_index)
        stage, state = self.plan.stages[stage_index], self.state
        if self.budget_split is not None and (not stage.epochs or self.budget_ended):
            return  # the budget gave it no epoch: nothing to set up (optimizer, statistics, cached features)
        if state.epoch < stage.epochs and not state.stopped and self.out_of_budget(stage_index, starting=True):
            return  # before the stage's set-up: its feature cache alone could pass the budget
        if not state.stopped and self._epochs_from(stage_index):
            self._stop_if_asked()  # before the stage's set-up (its feature cache pass), where an epoch is still to run
        if self.optimizer is None or state.epoch == 0:
            _, self.optimizer = self._enter(stage_index, self.optimizer)
            # A run resumed inside the stage's first epoch restored the statistics this pass gave it, and its average.
            if state.epoch == 0 and self.resume_point is None:
                if stage.batchnorm == "adapt":
                    self.adapt_statistics(stage_index)
                self.ema = self.start_ema()
        cached = self.stage_cache(stage_index) if state.epoch < stage.epochs and not state.stopped else None
        self._warn_found_while_decoding()
        self.engine.stage = stage_index
        head_only = all(self.adapter.in_head(name) for name, p in self.model.named_parameters() if p.requires_grad)
        self.engine.progress.kinds[stage_index] = FULL if cached is None else (CACHED if head_only else PREFIX)
        schedule = self._schedule(stage.epochs, cached)
        self.engine.before_step = distributed.average_gradients if (cached is not None and self.processes.distributed) else None
        while state.epoch < stage.epochs and not state.stopped:
            if self.out_of_budget(stage_index, starting=False):
                return  # the budget ends the run here: a stop asked for meanwhile changes nothing
            self._stop_if_asked()
            epoch_started = time.perf_counter()
            self.run_epoch(stage_index, schedule, cached)
            self._warn_found_while_decoding()
            state.epoch += 1
            patience = self.config.early_stopping
            # Decided before the checkpoint, so a crash after an early stop resumes into the next stage.
            state.stopped = bool(patience and state.stale >= patience and state.epoch < stage.epochs)
            self._save_checkpoint(self._checkpoint_state())
            for callback in callbacks:
                callback(state)
            self.epoch_wall[stage_index] = time.perf_counter() - epoch_started
            if state.stopped:
                self.engine.progress.epochs[stage_index] = state.epoch
                self._say(f"stage {stage.name!r}: no improvement in {patience} epochs, moving on")

    def _epochs_from(self, stage_index: int) -> int:
        """Epochs left to run in this stage and the ones after it (a stage of 0 epochs between two others has none)."""
        return self.plan.stages[stage_index].epochs - self.state.epoch + sum(s.epochs for s in self.plan.stages[stage_index + 1:])

    def _stop_if_asked(self) -> None:
        """A stop asked for in an epoch's last step or its val pass, which end the epoch (one batch an epoch: always):
        the run stops at the epoch's end, where its checkpoint was just written, not at the next epoch's last step."""
        # A resumed run's pending mid-epoch position: the stop comes in that epoch's first step, and says so.
        if self.stop_requested and self.state.history and self.resume_point is None:
            stage, epoch = self.plan.stages[self.state.stage], self.state.epoch
            where = f"in stage {stage.name!r}, after epoch {epoch}"
            if epoch == 0 and self.state.stage:  # the stage that last trained (one between may have had no epoch)
                where = f"after stage {self.state.history[-1]['stage']!r}, before {stage.name!r}"
            raise RunInterrupted(self._stopped_with_checkpoint(where), self.stopped_by)

    def plan_budget(self) -> None:
        """--budget: time a few batches, then choose the epochs per stage; rank 0 decides for every rank."""
        outcome: tuple | str | None = None
        if self.processes.is_main:
            try:
                outcome = self._split_budget()
            except Exception as error:  # noqa: BLE001 - every rank stops with rank 0's reason; none waits for a plan
                outcome = str(error) if isinstance(error, ThawError) else f"the budget could not be planned ({type(error).__name__}: {error})"
        if self.processes.distributed:
            outcome = distributed.broadcast(outcome)
        if isinstance(outcome, str):
            raise ThawError(outcome.splitlines()[0])
        self.plan, self.budget_split = outcome
        self._say(self.budget_split.describe())
        layers = [stage for stage, kind in zip(self.plan.stages, self._predicted_kinds()) if kind != CACHED]
        starved = [str(stage.name) for stage in layers if not stage.epochs]
        if starved:
            outcome = "only the head will train" if len(starved) == len(layers) else "they are skipped"
            self._say(f"budget: warning: no epoch fits for {', '.join(starved)} (stages that train layers); {outcome}")

    def replan_budget(self, stage_index: int) -> None:
        """--budget, at the start of every stage after the first: its epochs and those after it, from the time actually
        left. A resumed run keeps the epochs it had. Rank 0 decides for every rank."""
        split, epochs, left = self.budget_split, None, 0.0
        if self.processes.is_main:
            left = self.deadline - MARGIN * split.budget_s - time.perf_counter()
            planned = tuple(stage.epochs for stage in self.requested_plan.stages)
            # With cached views, a stage whose epochs change may need views the stage before did not cache.
            ready = self.cached is not None and not self.views
            epochs = resplit(split, planned, stage_index, left, cache_ready=ready)
            trains = [index for index in range(stage_index, len(planned)) if planned[index]]
            if not self.state.history and trains and not any(epochs[stage_index:]):  # the first epoch of a run always runs
                epochs = epochs[: trains[0]] + (1,) + epochs[trains[0] + 1 :]
        if self.processes.distributed:
            epochs = distributed.broadcast(epochs)
        if any(split.epochs[stage_index:]) and not any(epochs[stage_index:]):  # a plan with epochs left, now none
            self.budget_ended = f"before {self.plan.stages[stage_index].name}: no epoch of the stages left fits"
            self._say(f"budget: {clock(max(left, 0.0))} left; no epoch of the stages left fits, so the run ends here")
        if epochs == split.epochs:
            return
        expected = dict(split.expected_s) | {
            str(stage.name): count * seconds for stage, count, seconds in zip(self.plan.stages, epochs, split.epoch_s)
        }
        self.budget_split = replace(split, epochs=epochs, expected_s=expected)
        self.plan = with_epochs(self.requested_plan, epochs)
        for index in range(stage_index, len(epochs)):
            if self.engine.progress is not None:
                self.engine.progress.epochs[index] = epochs[index]
        self._say(f"budget: {clock(max(left, 0.0))} left before the margin; epochs per stage now {list(epochs)} (were {list(split.epochs)})")

    def _split_budget(self) -> tuple[Plan, Split]:
        kinds = self._predicted_kinds()
        entries = self._planned_entries(kinds)
        kinds = [FULL if kind == PREFIX and index not in entries else kind for index, kind in enumerate(kinds)]  # on the images
        full = [(resolve_stage(self.adapter, stage).trainable, stage.batchnorm) for stage, kind in zip(self.plan.stages, kinds) if kind == FULL]
        trainable, batchnorm = max(full, key=lambda found: len(found[0])) if full else ((), "frozen")
        top = None
        if entries:  # the costliest top stage: the one that trains the most
            index = max(entries, key=lambda index: len(resolve_stage(self.adapter, self.plan.stages[index]).trainable))
            stage = self.plan.stages[index]
            top = TopStage(frozenset(resolve_stage(self.adapter, stage).trainable), stage.batchnorm, entries[index])
        may_share = [index for index, kind in enumerate(kinds) if kind == CACHED and self._shares_at(index, entries.get(index + 1))]
        train = make_loader(self.train_set, batch_size=self.config.batch_size, shuffle=True, seed=self.config.seed,
                            workers=self.workers, processes=self.processes)
        costs = measure_costs(self.adapter, train, self.val_loader, self.engine, frozenset(trainable), batchnorm, top)
        world = self.processes.world
        sizes = {"train": math.ceil(len(self.data.train) / world), "val": math.ceil(len(self.data.val) / world)}
        spent = time.perf_counter() - self.began
        epochs = tuple(stage.epochs for stage in self.plan.stages)
        plan, split = split_budget(self.plan, kinds, costs, sizes, self.config.budget, spent, self.views, self._sharing(may_share, epochs))
        if self._sharing(may_share, split.epochs) != self._sharing(may_share, epochs):  # the chosen epochs decide it
            plan, split = split_budget(
                self.plan, kinds, costs, sizes, self.config.budget, spent, self.views, self._sharing(may_share, split.epochs)
            )
        return plan, split

    def _sharing(self, may_share: list[int], epochs: tuple[int, ...]) -> frozenset[int]:
        """The head stages of `may_share` that share their pass with the next stage at these epochs (shared_entry's
        rules that depend on them: the next stage trains, and both use as many cached views)."""
        views = self.views
        return frozenset(index for index in may_share if epochs[index + 1] and min(views, epochs[index + 1]) == min(views, epochs[index]))

    def _planned_entries(self, kinds: list[str]) -> dict[int, Entry]:
        """Per stage predicted to train its top groups over cached inputs: its entry, found and checked on a copy of
        the model with the stage's own freezing and BatchNorm locks, as the stage will find it. A stage missing here
        trains on the images. On this rank alone: rank 0 plans the budget."""
        entries = {}
        for index, (stage, kind) in enumerate(zip(self.plan.stages, kinds)):
            if kind == PREFIX and stage.epochs:
                trainable = resolve_stage(self.adapter, stage).trainable
                refused = self.prefix_refusal(trainable, self._statistics_move(stage, set(trainable)))
                found = refused or self._find_entry(trainable, self._entered_copy(stage))
                if isinstance(found, Entry):
                    entries[index] = found
        return entries

    def _entered_copy(self, stage: Stage) -> ModelAdapter:
        """A copy of the model with `stage`'s freezing and BatchNorm locks; the run's own model stays as it is."""
        entered = copy.deepcopy(self.adapter)
        apply_trainable(entered, list(resolve_stage(self.adapter, stage).trainable), stage.batchnorm)
        return entered

    def _shares_at(self, index: int, entry: Entry | None) -> bool:
        """Whether head stage `index` may take its features at the next stage's `entry` (one pass for both), by
        shared_entry's rules that do not depend on epochs (those: _sharing), on a copy; on this rank alone."""
        if entry is None:
            return False
        entered = self._entered_copy(self.plan.stages[index])
        trainable = tuple(name for name, param in entered.model.named_parameters() if param.requires_grad)
        return self._stages_may_share(index, trainable) and self._head_can_share(trainable, entry, entered)

    def _predicted_kinds(self) -> list[str]:
        return [self._predicted_kind(stage) for stage in self.plan.stages]

    def out_of_budget(self, stage_index: int, starting: bool) -> bool:
        """Whether the stage's next epoch (with the stage's set-up when `starting`) would end past the budget; if so the
        run ends here. The next epoch is timed like the stage's last one, else as the budget expected, else like the
        slowest epoch so far. The first epoch of a run always runs: a run must deliver a model."""
        if self.deadline is None or not self.state.history:
            return False
        split, expected = self.budget_split, self.epoch_wall.get(stage_index)
        if expected is not None:  # progressive resizing: the next epoch's crops may be larger than the last one's
            expected *= self.pixels(stage_index, self.state.epoch) / self.pixels(stage_index, self.state.epoch - 1)
        if expected is None:
            expected = split.epoch_s[stage_index] if split else max(self.epoch_wall.values(), default=0.0)
            planned = split.kinds[stage_index] if split and split.kinds else self._predicted_kind(self.plan.stages[stage_index])
            if starting and split and planned != FULL and self.cached is None:
                expected += split.cache_s / max(1, split.passes)
            if not starting and split and self.engine.progress is not None and self.engine.progress.kinds[stage_index] == FULL:
                expected = max(expected, split.full_epoch_s)  # planned over cached inputs, its entry check sent it to the images
        overruns = time.perf_counter() + expected > self.deadline
        if self.processes.distributed:  # rank 0's clock decides for every rank
            overruns = bool(distributed.broadcast(overruns))
        if overruns:
            stage = self.plan.stages[stage_index]
            self.budget_ended = f"before {stage.name} epoch {self.state.epoch + 1}/{stage.epochs}"
            self._say(f"budget: the next epoch would end after the budget; the run ends {self.budget_ended}")
        return overruns

    def start_ema(self) -> nn.Module | None:
        """A new weight average for the stage just entered, where --ema asks and it trains pretrained layers.
        A head-only stage trains on cached features and gains nothing: its head is what the next stage starts from."""
        trainable = [name for name, param in self.model.named_parameters() if param.requires_grad]
        if not self.config.ema or not self.plan.stages[self.state.stage].epochs or all(self.adapter.in_head(n) for n in trainable):
            return None
        return weight_average(self.model)

    def _update_ema(self, _optimizer: torch.optim.Optimizer, step: int, _factor: float) -> None:
        """After every optimizer step: the stage's step count sets the decay, so a resumed run averages the same."""
        if self.ema is not None:
            self.ema.update(self.model, step=step + 1)

    def delivered_model(self) -> nn.Module:
        """What val measures and the run delivers: the weight average where one is kept, else the weights."""
        return self.ema.module if self.ema is not None else self.model

    def adapt_statistics(self, stage_index: int) -> None:
        """BatchNorm policy adapt: the statistics re-estimated on the training images (evaluation view), then fixed."""
        name = self.plan.stages[stage_index].name
        if not has_statistics(self.model):
            self._say(f"stage {name!r}: batchnorm adapt has nothing to adapt (no BatchNorm layer keeps statistics)")
            return
        started = time.perf_counter()
        # Shuffled (by the run's seed, so a run repeats): batches of class-ordered samples would hold one class each.
        # At least 2 images a batch: one image has no batch statistics.
        loader = make_loader(
            self.dataset("train-eval"), batch_size=max(2, self.config.batch_size), shuffle=True, seed=self.config.seed,
            workers=self.workers, processes=self.processes,
        )
        seen = adapt_batchnorm(self.model, loader, self.engine, self.processes)
        if seen == 0:
            self._say(f"stage {name!r}: batchnorm adapt found no batch of 2 training images; the statistics are kept as they were")
            return
        self._say(f"stage {name!r}: BatchNorm statistics re-estimated on {seen} training images in {time.perf_counter() - started:.1f} s")

    def _restore_replaced_run(self) -> None:
        try:
            restore_run(self.out, self.set_aside)
        except OSError as error:  # never hide why the run ended behind this; say where the old run lies
            print(f"thaw: warning: the run this one replaced is still in {self.set_aside} ({first_line(error)})", file=sys.stderr)
        self.set_aside = None

    def _warn(self, message: str) -> None:
        """A warning, on stderr whatever `quiet` (--quiet, --json) says: quiet leaves out the progress, never what is
        wrong with the run's data or settings. stdout carries the epochs and the summary (one JSON line with --json)."""
        if self.processes.is_main:  # torchrun's other ranks train the same run
            print(f"thaw: warning: {message}", file=sys.stderr, flush=True)

    def _warn_skipped(self, skipped: list[tuple[str, str]]) -> None:
        if skipped:
            self._warn(describe_skipped(tuple(skipped), rows=isinstance(self.data, TextData)))

    def _refuse_emptied_classes(self) -> None:
        """A class that decoding left with no image (every file of it truncated, say) is refused as the listing refuses
        an empty class folder: where images are decoded before the first epoch (the pixel store, a stage's feature
        cache), before any training. Every rank asks (its shard's failures are gathered), so every rank stops alike."""
        failed = dict(self.engine.failed)
        if self.store is not None:
            failed.update((str(path), reason) for path, reason in self.store.unreadable.items())
        if self.processes.distributed:
            failed = dict(distributed.gather_lists(sorted(failed.items())))
        problem = classes_emptied_by_decoding(self.data, failed)
        if problem:
            raise ThawError(problem)

    def _warn_found_while_decoding(self) -> None:
        """Files whose header read but whose pixels did not (a truncated JPEG), said as soon as a pass found them (the
        stage's caching pass or an epoch), not at the run's end: the user can stop a long run and fix them. A class
        they emptied ends the run."""
        self._refuse_emptied_classes()
        found = [item for item in self.engine.failed if item not in self.warned_failures]
        if found and self.processes.is_main:
            self.warned_failures.extend(found)
            self._warn_skipped(found)

    def _say(self, message: str) -> None:
        if not self.config.quiet and self.processes.is_main:
            print(message, flush=True)

    def _on_interrupt(self, signum: int, _frame: object) -> None:
        if self.cleaning:  # the run has ended: put back the run it replaced, end the workers, then act on it
            self.held_signal = self.held_signal or signum
            return
        if self.stop_requested:
            if signum == signal.SIGINT:  # a second Ctrl-C: stop now, the last checkpoint stays as it is
                raise KeyboardInterrupt
            return  # SIGTERM again: `timeout` sends it to the process, then to its group; the kill that follows is the caller's
        self.stop_requested, self.stopped_by = True, signum
        asked = "" if signum == signal.SIGINT else f"{signal.Signals(signum).name}: "
        abort = "Ctrl-C again" if signum == signal.SIGINT else "SIGINT (Ctrl-C) or SIGKILL"  # a second SIGTERM does nothing
        print(f"\nthaw: {asked}finishing the current step to save a resumable checkpoint ({abort} to abort)", flush=True)

    @memory_kept_between_steps()  # every step reuses the pages the step before freed (see thaw._allocator)
    def fit(self, resume: bool, callbacks: list[EpochCallback]) -> RunResult:
        # Under torchrun, Ctrl-C reaches every rank at a different step: let torchrun stop them all,
        # and resume from the last epoch checkpoint.
        in_main_thread = threading.current_thread() is threading.main_thread() and not self.processes.distributed
        self.cleaning, self.held_signal = False, None
        # A handler set outside Python (getsignal gives None) cannot be put back: such a signal stays the caller's.
        taken = [number for number in STOP_SIGNALS if signal.getsignal(number) is not None] if in_main_thread else []
        previous = {number: signal.signal(number, self._on_interrupt) for number in taken}
        result: RunResult | None = None
        try:
            result = self._fit(resume, callbacks)
            return result
        except (RuntimeError, CompileFailed) as error:
            # What the stop brought about: a signal sent to the whole job (timeout, SLURM, Ctrl-C at a terminal) ends
            # decoding workers that do not outlive it (see WorkerLoader; SIGTERM) and torch.compile's C++ compilers
            # (the backward compiles lazily, outside the forward's own catch). Any other error, or one without that
            # stop, stays what it is; a compile failure without a stop is one line.
            compiled = self.config.compile and isinstance(error, compile_failures())  # not a model's own compiled part
            failed = error if isinstance(error, CompileFailed) else compile_failed(error) if compiled else None
            worker = self.stopped_by == signal.SIGTERM and "DataLoader worker (pid" in str(error)
            if self.stop_requested and (worker or failed):
                ended = f"torch.compile's compiler ({failed.reason})" if failed else f"this: {first_line(error)}"
                said = interrupted_before_training(self.out, f"by {signal.Signals(self.stopped_by).name}, which also ended {ended}")
                raise RunInterrupted(said, self.stopped_by) from error
            if failed is not None and failed is not error:
                raise failed from None
            raise
        finally:
            self.cleaning = True
            try:
                self._clean_up()
            finally:  # whatever the clean-up raised: the caller's handlers are back, then a signal held meanwhile
                for number, handler in previous.items():
                    signal.signal(number, handler)
                if self.held_signal is not None and not self.stop_requested:  # a stopping run has its answer already
                    if result is not None:  # trained to its end: delivered once the run's files are written
                        result.held_signal = self.held_signal
                    else:
                        signal.raise_signal(self.held_signal)

    def _clean_up(self) -> None:
        if self.set_aside is not None:  # ended before its first checkpoint: the run it was to replace comes back
            self._restore_replaced_run()
        try:
            self.release_cache()
        finally:  # whatever failed above, workers end and pixels go
            stop_workers(self.persistent_train_loader, self.val_loader)  # a traceback may still hold the loaders
            self.persistent_train_loader = None
            if self.store is not None:
                self.store.release()
                remove_if_empty(self.out / CACHE_FOLDER)

    def _fit(self, resume: bool, callbacks: list[EpochCallback]) -> RunResult:
        started = time.perf_counter()
        remove_spill_files(self.out / CACHE_FOLDER)  # left by a run that was killed
        exists = (self.out / ckpt.CHECKPOINT).is_file() if self.processes.is_main else False
        if self.processes.distributed:
            exists = distributed.broadcast(exists)
        if resume and exists:
            self.restore()
        elif resume:
            if self.processes.is_main:
                check_nothing_set_aside(self.out)
            self._say(f"no checkpoint in {self.out} yet: starting the run from the beginning")
        self._say(data_line(self.data))
        self._warn_skipped(list(self.data.skipped))  # before training: a user can stop the run and fix the files
        for note in self.data.notes:
            self._warn(note)
        self.fill_store()
        self._refuse_emptied_classes()
        if self.config.budget is not None:
            if not self.restored:  # a resumed run keeps the epochs its budget chose, and gets the budget again
                self.plan_budget()
            self.deadline = (started if self.restored else self.began) + self.config.budget
        if self.replaces_run:  # every check has passed and the data is ready: only now is the old run moved away
            self.set_aside = set_aside_run(self.out)
        self.engine.progress = self.plan_progress()
        while self.state.stage < len(self.plan.stages):
            self.run_stage(self.state.stage, callbacks)
            if self.state.stage + 1 == len(self.plan.stages) or self.budget_ended:
                break
            # No checkpoint here: the last epoch's one already says this stage is finished,
            # and its optimizer still holds this stage's groups.
            if not self.keep_cache:
                self.release_cache()  # the stage is over: its features (and spill files) go
            self.keep_cache = False
            state = self.state
            state.stage, state.epoch, state.stale, state.stopped = state.stage + 1, 0, 0, False
        if self.stop_requested:  # asked for in the run's last step or val pass, after "finishing the current step"
            self._say("the stop came as the run's last epoch ended: nothing was left to train, so the run ends complete")
        wall = time.perf_counter() - started
        failed = self.engine.failed
        if self.processes.distributed:  # each rank decodes its own shard: report what failed anywhere
            failed = distributed.gather_lists([tuple(item) for item in failed])
        skipped = list(self.data.skipped) + failed
        self._warn_skipped([item for item in failed if item not in self.warned_failures])  # other ranks' (torchrun)
        rate = self.train_images / self.train_seconds if self.train_seconds else 0.0
        budget = None
        if self.config.budget is not None:
            planned = self.budget_split.to_dict() if self.budget_split else {"seconds": self.config.budget}
            budget = planned | {"ended_early": self.budget_ended}
        decoded = self.store.decoded if self.store is not None else 0
        return RunResult(
            self.out, self.state.best, self.state.history, wall, rate, skipped, self.engine, self.plan, budget, self.cache_seconds,
            self.decode_seconds, decoded,
        )


def fit(
    adapter: ModelAdapter,
    data: ImageData | TextData,
    plan: Plan,
    config: TrainConfig,
    out: Path,
    *,
    meta: dict,
    resume: bool = False,
    overwrite: bool = False,
    callbacks: list[EpochCallback] | None = None,
    step_hooks: list[StepHook] | None = None,
) -> RunResult:
    """Train `adapter` on `data` by `plan`; RUN/ gets the best weights and a checkpoint every epoch.

    A new run (not `resume`) refuses a folder that holds a run, unless `overwrite`: then the old run's files go,
    once every check has passed. Under torchrun (WORLD_SIZE > 1) every rank calls this; rank 0 writes.
    """
    model_name = meta.get("model", type(adapter.model).__name__)
    check_image_size(adapter, config, model_name)  # before any data is decoded
    check_progressive_resize(adapter, config, [stage.epochs for stage in plan.stages], model_name)
    task = "image" if isinstance(adapter.preprocessing, Preprocessing) else "text"
    check_image_augments(config, task, resumed=resume)
    processes = distributed.from_environment()
    config = replace(config, device=distributed.start(processes, config.device), quiet=config.quiet or not processes.is_main)
    problem = compile_problem(resolve_device(config.device), task) if config.compile else None
    if problem:
        raise ThawError(problem)
    if processes.is_main:
        check_writable(out, RESUME_NOT_WRITABLE if resume and holds_run(out) else NEW_RUN_NOT_WRITABLE)
        if resume and overwrite:
            raise ThawError("overwrite starts a new run and resume continues one; drop one of the two")
    with training_lock(out) if processes.is_main else nullcontext():
        # under the lock: a second run started beside it sees the first; a resume with no checkpoint starts a new run
        if processes.is_main and (not resume or not holds_run(out)):
            check_new_run(out, overwrite)
        if data.skipped and config.strict:
            raise undecodable(*data.skipped[0])
        trainer = Trainer(adapter, data, plan, config, out, meta, processes)
        trainer.replaces_run = processes.is_main and not resume and overwrite and holds_run(out)
        trainer.engine.step_hooks.extend(step_hooks or [])
        for hook in step_hooks or []:  # loggers read the trainer (steps, val outputs); they never change it
            if hasattr(hook, "attach"):
                hook.attach(trainer)
        return trainer.fit(resume, callbacks or [])

