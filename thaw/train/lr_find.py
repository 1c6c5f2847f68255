"""The lr range test: raise the lr exponentially, watch the loss, suggest where it falls fastest."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from thaw.data.folders import ImageData
from thaw.data.loaders import ImageDataset, make_loader
from thaw.data.transforms import train_transform
from thaw.errors import ThawError
from thaw.models import ModelAdapter
from thaw.plan import Stage
from thaw.plan.lr import MAX_LR, ConstantLr
from thaw.train.config import TrainConfig
from thaw.train.fit import choose_engine
from thaw.plan import enter_stage

SMOOTHING = 0.9  # exponential moving average of the loss, as fastai and Leslie Smith do
START_STEPS = 5  # the curve's start: the highest of its first smoothed values
FLAT_FALL = 0.05  # of the starting loss: a smaller fall over the whole range is no fall to suggest an lr from


def lr_range_test(
    adapter: ModelAdapter, data: ImageData, *, train: tuple[str, ...] = ("head",), start: float = 1e-7, end: float = 1.0, steps: int = 100, config: TrainConfig = TrainConfig()
) -> tuple[list[float], list[float]]:
    """(lrs, smoothed losses), stopping once the loss explodes."""
    if not (math.isfinite(end) and 0 < start < end <= MAX_LR):
        raise ThawError(f"lr-find needs 0 < start < end <= {MAX_LR:g}, got {start} and {end}")
    engine = choose_engine(config, adapter.model)
    adapter.model.to(engine.device)
    _, optimizer = enter_stage(adapter, Stage("lr-find", 1, train, ConstantLr(start)), optimizer_name=config.optimizer)
    dataset = ImageDataset(data.train, train_transform(adapter.preprocessing), 2 * adapter.preprocessing.resize_size)
    torch.manual_seed(config.seed)
    lrs, losses, average, best = [], [], 0.0, math.inf
    adapter.model.train()
    while len(lrs) < steps:
        for batch in make_loader(dataset, batch_size=config.batch_size, shuffle=True, seed=config.seed + len(lrs)):
            lr = start * (end / start) ** (len(lrs) / max(1, steps - 1))
            for group in optimizer.param_groups:
                group["lr"] = lr
            with engine.autocast():
                logits = adapter.model(engine.to_device(batch.images))
            loss = nn.functional.cross_entropy(logits.float(), batch.labels.to(engine.device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            average = SMOOTHING * average + (1 - SMOOTHING) * loss.item()
            smoothed = average / (1 - SMOOTHING ** (len(lrs) + 1))
            lrs.append(lr)
            losses.append(smoothed)
            best = min(best, smoothed)
            if not math.isfinite(smoothed) or smoothed > 4 * best or len(lrs) >= steps:
                return lrs, losses
    return lrs, losses


def suggest(lrs: list[float], losses: list[float]) -> float | None:
    """The lr where the smoothed loss falls fastest (per log-lr), between where it started and its minimum after
    that; None where it never falls by FLAT_FALL of where it started (a flat or rising curve: its steepest step is
    noise, and no lr to train with). Where it started is the highest of its first START_STEPS values: the first
    is one batch's loss alone (the average's bias correction), which may sit well below the curve."""
    if len(lrs) < 5:
        raise ThawError("lr-find ran too few steps to suggest an lr; use more data or --steps")
    start = max(range(min(START_STEPS, len(losses))), key=losses.__getitem__)
    stop = min(range(start, len(losses)), key=losses.__getitem__)
    if not losses[start] - losses[stop] >= FLAT_FALL * abs(losses[start]):
        return None
    window = range(start + 1, max(start + 2, stop))
    slopes = [(losses[i] - losses[i - 1]) / (math.log(lrs[i]) - math.log(lrs[i - 1])) for i in window]
    steepest = min(range(len(slopes)), key=slopes.__getitem__)
    return lrs[list(window)[steepest]]


def plot_lr_find(lrs: list[float], losses: list[float], suggestion: float | None, path: Path) -> Path:
    from thaw.train.plots import plt

    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot(lrs, losses)
    if suggestion is not None:
        axis.axvline(suggestion, color="red", linestyle="--", label=f"suggested {suggestion:.2g}")
        axis.legend()
    else:
        axis.set_title("the loss did not fall: no lr suggested")
    axis.set_xscale("log")
    axis.set_xlabel("learning rate")
    axis.set_ylabel("loss (smoothed)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
