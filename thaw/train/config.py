"""How to train (not what: that is the plan). A frozen dataclass the CLI and YAML only fill."""

from __future__ import annotations

from dataclasses import dataclass

SCHEDULES = ("cosine", "onecycle", "constant")
PRECISIONS = ("auto", "bf16", "fp32")
METRICS = ("accuracy", "macro_f1", "loss")


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 32
    optimizer: str = "adamw"
    schedule: str = "cosine"
    warmup: float = 0.1  # share of each stage's steps; newly unfrozen groups start low, not at full lr
    precision: str = "auto"
    channels_last: bool = True  # only applied to models with convolutions
    grad_clip: float | None = None
    accumulate: int = 1
    seed: int = 0
    workers: int | None = None
    metric: str = "accuracy"
    early_stopping: int | None = None  # epochs without improvement before a stage ends early
    augment: bool = True
    image_size: int | None = None  # overrides the weights' crop size (the demo's 8x8 digits)
    strict: bool = False  # unreadable files fail the run instead of being skipped
    device: str = "auto"
    quiet: bool = False
    cache: bool = True  # frozen-feature cache for head-only stages, where it is exact
    cache_views: int = 0  # 0: cache the evaluation view; K: K augmented views, cycled by epoch
    cache_memory_gb: float = 4.0  # per split; past it features spill to a memory-mapped file
    decoded_memory_gb: float = 2.0  # decoded images kept in memory between epochs
