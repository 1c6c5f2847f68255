"""The lr range test: raise the lr exponentially, watch the loss, suggest where it falls fastest."""

from __future__ import annotations

import logging
import math
import re
import statistics
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from PIL import Image
from torch import nn

from thaw._io import atomic_write
from thaw.data.folders import ImageData
from thaw.data.loaders import ImageDataset, make_loader
from thaw.data.transforms import train_transform
from thaw.errors import ThawError
from thaw.models import ModelAdapter
from thaw.plan import Stage
from thaw.plan.lr import MAX_LR, ConstantLr
from thaw.train.config import TrainConfig
from thaw.train.fit import choose_engine, effective_preprocessing
from thaw.plan import enter_stage
from thaw.plan.freeze import needs_two_images

SMOOTHING = 0.9  # exponential moving average of the loss, as fastai and Leslie Smith do
NOISE_STEPS = 10  # first steps whose batch losses give the start level and the batch-to-batch noise (a tenth of a short test)
NOISE_SIGMAS = 4  # a flat curve's lowest point over 100 steps lies about 3 of its own spreads below its level
FLAT_FALL = 0.05  # of the starting loss: a smaller fall over the whole range is no fall to suggest an lr from
PLOT_MAKER = "thaw lr-find"  # written into the plot's metadata: what tells a plot of ours from a user's file of that name
_BY_METADATA = {"metadata": {"Creator": PLOT_MAKER}}
# What savefig writes the maker's name with, per format; the formats not here (webp, gif, raw...) carry none.
MARK_WRITERS = {
    "png": {"metadata": {"Software": PLOT_MAKER}},
    "pdf": _BY_METADATA, "svg": _BY_METADATA, "svgz": _BY_METADATA, "ps": _BY_METADATA, "eps": _BY_METADATA,
    "jpg": {"pil_kwargs": {"comment": PLOT_MAKER.encode()}}, "jpeg": {"pil_kwargs": {"comment": PLOT_MAKER.encode()}},
    "tif": {"pil_kwargs": {"tiffinfo": {305: PLOT_MAKER}}}, "tiff": {"pil_kwargs": {"tiffinfo": {305: PLOT_MAKER}}},  # 305: Software
}
DEFAULT_PLOT = "lr_find.png"  # lr-find's default --out: a matplotlib PNG of this name is an earlier thaw's plot, made before the mark
MAX_PLOT_BYTES = 4 << 20  # an lr-find plot is tens of KB in any of these formats: a larger file is none of ours


def lr_range_test(
    adapter: ModelAdapter, data: ImageData, *, train: tuple[str, ...] = ("head",), start: float = 1e-7, end: float = 1.0, steps: int = 100,
    config: TrainConfig = TrainConfig(), undecodable: list[tuple[str, str]] | None = None,
) -> tuple[list[float], list[float]]:
    """(lrs, smoothed losses), stopping once the loss explodes. Files whose pixels did not decode (a truncated JPEG:
    its header passed the listing) are left out of their batch and, once each, appended to `undecodable`."""
    if not (math.isfinite(end) and 0 < start < end <= MAX_LR):
        raise ThawError(f"lr-find needs 0 < start < end <= {MAX_LR:g}, got {start} and {end}")
    engine = choose_engine(config, adapter.model)
    adapter.model.to(engine.device)
    _, optimizer = enter_stage(adapter, Stage("lr-find", 1, train, ConstantLr(start)), optimizer_name=config.optimizer)
    preprocessing = effective_preprocessing(adapter, config)  # config.image_size: the size the run will train at
    dataset = ImageDataset(data.train, train_transform(preprocessing), 2 * preprocessing.resize_size)
    torch.manual_seed(config.seed)
    lrs, losses, average, best = [], [], 0.0, math.inf
    adapter.model.train()
    # BatchNorm layers that train normalise with the batch's statistics, which a batch of one image has not (a
    # traceback from torch): such a batch is left out, as training leaves out a last batch of one
    batch_statistics = needs_two_images(adapter.model)
    if batch_statistics and config.batch_size < 2:
        raise ThawError(
            "lr-find: BatchNorm layers that train use batch statistics, which one image per batch does not have; "
            "use --batch-size 2 or more (batch_size), or train only layers without BatchNorm (--train head)"
        )
    while len(lrs) < steps:
        before, singles = len(lrs), 0  # singles: images this pass left out as batches of one
        for batch in make_loader(dataset, batch_size=config.batch_size, shuffle=True, seed=config.seed + len(lrs)):
            if undecodable is not None:
                undecodable.extend(failure for failure in batch.failed if failure not in undecodable)
            if len(batch.labels) < (2 if batch_statistics else 1):  # every image failed to decode, or one is left
                singles += len(batch.labels)
                continue
            lr = start * (end / start) ** (len(lrs) / max(1, steps - 1))
            for group in optimizer.param_groups:
                group["lr"] = lr
            with engine.autocast():
                logits = adapter.model(engine.to_device(batch.images))
            loss = nn.functional.cross_entropy(logits.float(), batch.labels.to(engine.device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            average, smoothed = smoothing_step(average, loss.item(), len(lrs))
            lrs.append(lr)
            losses.append(smoothed)
            best = min(best, smoothed)
            if not math.isfinite(smoothed) or smoothed > 4 * best or len(lrs) >= steps:
                return lrs, losses
        if len(lrs) == before and singles:  # every batch that decoded held one image, which BatchNorm cannot use
            raise ThawError("lr-find: every batch that decoded held one image, which BatchNorm layers that train cannot "
                            "use; give it more readable images, or train only layers without BatchNorm (--train head)")
        if len(lrs) == before:  # a whole pass and no image decoded: another pass would find none either
            raise ThawError("lr-find: no training image of the data decoded; replace or remove the files")
    return lrs, losses


def suggest(lrs: list[float], losses: list[float]) -> float | None:
    """The lr where the smoothed loss falls fastest (per log-lr), between the first steps and its minimum; None where the loss never falls
    below where it started by FLAT_FALL of it and by NOISE_SIGMAS of the smoothed curve's own noise (a flat or
    rising curve, whose lowest point is noise, as is its steepest step). Where it started, and how much the loss
    varies from batch to batch, are read off the batch losses of the first steps, at lrs too small to change much."""
    if len(lrs) < 5:
        raise ThawError("lr-find ran too few steps to suggest an lr; use more data or more steps (steps, --steps)")
    first = batch_losses(losses)[: max(3, min(NOISE_STEPS, len(losses) // 10))]
    level, spread = statistics.fmean(first), statistics.pstdev(first)
    # The curve's own spread (an average's) and the level's (a mean of few batches); the curve's first values, barely
    # averaged yet, are as noisy as one batch: its lowest point is looked for after them.
    noise = math.hypot(spread * math.sqrt((1 - SMOOTHING) / (1 + SMOOTHING)), spread / math.sqrt(len(first)))
    stop = min(range(len(first), len(losses)), key=losses.__getitem__, default=len(losses) - 1)
    if not level - losses[stop] >= max(FLAT_FALL * abs(level), NOISE_SIGMAS * noise):
        return None
    window = range(len(first), max(len(first) + 1, stop))  # steps whose slope is taken from the one before
    slopes = [(losses[i] - losses[i - 1]) / (math.log(lrs[i]) - math.log(lrs[i - 1])) for i in window]
    steepest = min(range(len(slopes)), key=slopes.__getitem__)
    return lrs[list(window)[steepest]]


def smoothed_losses(batch: list[float]) -> list[float]:
    """The curve lr-find draws: an exponential moving average of the batch losses, corrected for its start at 0."""
    curve, average = [], 0.0
    for step, loss in enumerate(batch):
        average, smoothed = smoothing_step(average, loss, step)
        curve.append(smoothed)
    return curve


def smoothing_step(average: float, loss: float, step: int) -> tuple[float, float]:
    """The moving average after one more batch loss, and the curve's value: the average corrected for its start at 0.
    The one formula lr_range_test draws with and batch_losses undoes."""
    average = SMOOTHING * average + (1 - SMOOTHING) * loss
    return average, average / (1 - SMOOTHING ** (step + 1))


def batch_losses(curve: list[float]) -> list[float]:
    """The batch losses a smoothed curve was made of (smoothed_losses undone)."""
    batch, before = [], 0.0
    for step, value in enumerate(curve):
        average = value * (1 - SMOOTHING ** (step + 1))
        batch.append((average - SMOOTHING * before) / (1 - SMOOTHING))
        before = average
    return batch


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
    if not path.suffix:  # as matplotlib names it
        path = path.with_name(path.name + ".png")
    kind = path.suffix[1:].lower()
    marked = MARK_WRITERS.get(kind, {})
    try:  # atomic: an earlier plot stays whole if this one cannot be written
        atomic_write(path, lambda temporary: figure.savefig(temporary, dpi=100, format=kind, **marked))
    finally:
        plt.close(figure)
    return path


def is_lr_find_plot(path: Path) -> bool:
    """Whether the file at `path` is a plot thaw lr-find wrote (and may replace): the maker's name, exactly, where
    its format keeps it (PIL's reading of a PNG, JPEG or TIFF; a PDF's one Creator entry, an SVG's creator in its
    metadata before any drawing, PostScript's first Creator comment in its header). A user's title "thaw lr-find",
    or our plot embedded inside another document, is no mark."""
    kind = path.suffix[1:].lower()
    if kind not in MARK_WRITERS:
        return False
    try:
        if path.stat().st_size > MAX_PLOT_BYTES:
            return False
        if kind in _TEXT_MAKERS:
            return _TEXT_MAKERS[kind](_plot_text(path, kind))
        maker, size = _raster_maker(path)
    except (OSError, EOFError, ValueError, SyntaxError, zlib.error, Image.DecompressionBombError):  # none of ours
        return False
    # An earlier thaw's default plot, made before the mark: matplotlib's name for itself, at lr-find's 6x4 in, 100 dpi.
    earlier = path.name == DEFAULT_PLOT and str(maker).startswith("Matplotlib version") and size == (600, 400)
    return maker == PLOT_MAKER or earlier


def _plot_text(path: Path, kind: str) -> bytes:
    """The file's bytes; an svgz's inflated, at most MAX_PLOT_BYTES of them (a small file may inflate to gigabytes)."""
    content = path.read_bytes()
    if kind != "svgz":
        return content
    return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(content, MAX_PLOT_BYTES)  # 16: a gzip header


def _pdf_made_by_us(content: bytes) -> bool:
    return content.count(b"/Creator (") == 1 and b"/Creator (thaw lr-find)" in content


def _svg_made_by_us(content: bytes) -> bool:
    found = re.search(rb"<metadata>(.*?)</metadata>", content, re.DOTALL)
    drawing = content.find(b"<g")
    return (
        found is not None and (drawing == -1 or found.start() < drawing)
        and re.search(rb"<dc:creator>\s*<cc:Agent>\s*<dc:title>thaw lr-find</dc:title>", found.group(1)) is not None
    )


def _ps_made_by_us(content: bytes) -> bool:
    header = content.split(b"%%EndComments", 1)[0]
    creators = [line.rstrip(b"\r") for line in header.split(b"\n") if line.startswith(b"%%Creator:")]
    return bool(creators) and creators[0] == b"%%Creator: thaw lr-find"


_TEXT_MAKERS = {"pdf": _pdf_made_by_us, "svg": _svg_made_by_us, "svgz": _svg_made_by_us, "ps": _ps_made_by_us, "eps": _ps_made_by_us}


def _raster_maker(path: Path) -> tuple[str | None, tuple[int, int]]:
    """The program a PNG (Software), JPEG (its comment) or TIFF (Software tag) names as its maker, and its size; PIL's
    warnings and log lines about a damaged file are kept off the user's screen (the refusal is the one line)."""
    with warnings.catch_warnings(), _pil_log_muted():
        warnings.simplefilter("ignore")
        with Image.open(path) as image:
            maker = None
            if image.format == "PNG":
                maker = image.info.get("Software")  # the text chunks before the pixels, read without decoding them
            elif image.format == "JPEG":
                comment = image.info.get("comment")
                maker = comment.decode("latin-1") if isinstance(comment, bytes) else comment
            elif image.format == "TIFF":
                maker = image.tag_v2.get(305)
            return maker, image.size


@contextmanager
def _pil_log_muted() -> Iterator[None]:
    log = logging.getLogger("PIL")
    was = log.disabled
    log.disabled = True
    try:
        yield
    finally:
        log.disabled = was
