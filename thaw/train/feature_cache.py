"""The frozen-feature cache: run the frozen part of the network once, train the head many times.

A stage qualifies when only the head trains and every BatchNorm before it is
eval-locked (policies frozen and eval), so the features cannot change between
epochs. A stage that trains the top groups caches the frozen bottom's output the
same way (thaw.train.prefix_cache says where it enters the network). The frozen part
runs in eval mode (dropout and stochastic depth off), as a frozen feature extractor should. Features are stored as computed (bf16
under bf16 autocast, fp32 otherwise), in memory up to the run's budget and in a
memory-mapped file past it (deleted when the stage ends), keyed by a
fingerprint of everything that produced them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from torch.utils.data import Dataset

from thaw.data.loaders import Batch, make_loader, seeded_order
from thaw.data.pixel_store import SPILL_SUFFIX
from thaw.distributed import SINGLE, Processes, collective_device
from thaw.models.adapter import ModelAdapter
from thaw.plan.freeze import batchnorm_layers, is_eval_locked
from thaw.train.loop import Engine
from thaw.train.prefix_cache import Entry, capture, in_tail, tail_forward
from thaw.train.progress import bars_disabled


def why_not_cached(adapter: ModelAdapter, trainable: tuple[str, ...]) -> str | None:
    """None when a stage can train on cached features, else the reason it cannot.

    Only the head may train: anything before it (BatchNorm weights included) is not in the
    graph when the head runs on stored features, so it would get no gradient and never train.
    """
    outside_head = [name for name in trainable if not adapter.in_head(name)]
    if outside_head:
        return f"parameters before the head train in this stage ({outside_head[0]}{' ...' if len(outside_head) > 1 else ''})"
    for name, layer in batchnorm_layers(adapter.model):
        if not adapter.in_head(name) and not is_eval_locked(layer):
            return f"BatchNorm {name} updates its statistics (policy train), so features change every step"
    return None


def fingerprint(
    adapter: ModelAdapter, trainable: tuple[str, ...], preprocessing: object, samples: tuple[tuple[object, int], ...], views: str,
    entry: Entry | None = None,
) -> str:
    """Everything that decides the features: frozen weights, what trains, preprocessing, views, the files. With
    `entry` (the frozen bottom's output): every weight outside the modules that run from the boundary on, not what
    trains, so the next stage of a gradual plan finds the features the stage before cached for it."""
    digest = hashlib.sha256()
    description = {
        "head": adapter.head_name, "trainable": sorted(trainable) if entry is None else None, "entry": asdict(entry) if entry else None,
        "preprocessing": asdict(preprocessing), "views": views, "torch": torch.__version__,
    }
    digest.update(json.dumps(description, sort_keys=True).encode())
    changing = set(adapter.group("head").params) | set(trainable)

    def decides(name: str) -> bool:  # head features: every frozen tensor; the bottom's output: every tensor outside the tail
        return not in_tail(name, entry) if entry is not None else name not in changing

    for name, tensor in adapter.model.state_dict().items():
        if decides(name):
            digest.update(name.encode("utf-8", "surrogateescape"))
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    for item, label in samples:
        if isinstance(item, Path):  # an image file: its size and time stand for its content
            stat = item.stat()
            digest.update(f"{item}|{label}|{stat.st_size}|{stat.st_mtime_ns}".encode("utf-8", "surrogateescape"))  # a name that is not UTF-8: its bytes
        else:  # a text sample is its own content
            digest.update(f"{label}|{len(item)}|{item}".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:20]


CACHE_FOLDER = "feature-cache"  # in the run folder: features past the memory budget, deleted when their stage ends


class MemoryBudget:
    """One memory budget for every cached feature of a run; a store that does not fit what is left spills to disk."""

    def __init__(self, total_bytes: int) -> None:
        self.total, self.used = total_bytes, 0

    def take(self, size: int) -> bool:
        if self.used + size > self.total:
            return False
        self.used += size
        return True

    def give_back(self, size: int) -> None:
        self.used -= size


@dataclass
class FeatureSet:
    features: torch.Tensor  # as computed, in memory or over a memory-mapped file
    labels: torch.Tensor
    budget: MemoryBudget | None = None  # where its in-memory bytes came from
    reserved: int = 0
    spill: Path | None = None  # its memory-mapped file, if it spilled

    def release(self) -> None:
        """Give the memory back to the run's budget and delete the spill file."""
        if self.budget is not None:
            self.budget.give_back(self.reserved)
        self.budget, self.reserved, self.features = None, 0, torch.empty(0)
        if self.spill is not None:
            self.spill.unlink(missing_ok=True)
            self.spill = None


def remove_spill_files(folder: Path) -> None:
    """Delete spill files a killed run left behind, and the folder once empty."""
    if folder.is_dir():
        for path in (*folder.glob("*.npy"), *folder.glob(f"*{SPILL_SUFFIX}")):  # features, decoded pixels
            path.unlink(missing_ok=True)
        remove_if_empty(folder)


def remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # missing, or another rank's files are still there
        pass


class _Store:
    """Pre-allocated rows, in memory while the run's budget lasts, else in a memory-mapped file."""

    def __init__(self, rows: int, shape: tuple[int, ...], dtype: torch.dtype, budget: MemoryBudget, spill_path: Path) -> None:
        size = rows * int(np.prod(shape)) * dtype.itemsize
        self.budget, self.reserved, self.spill = budget, 0, None
        if budget.take(size):
            self.tensor, self.reserved = torch.empty((rows, *shape), dtype=dtype), size
        else:
            # numpy has no bfloat16: the file holds the raw bit patterns.
            spill_path.parent.mkdir(parents=True, exist_ok=True)
            raw = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[dtype.itemsize]
            array = np.lib.format.open_memmap(spill_path, mode="w+", dtype=raw, shape=(rows, *shape))
            self.tensor, self.spill = torch.from_numpy(array).view(dtype), spill_path
        self.count = 0

    def add(self, rows: torch.Tensor) -> None:
        self.tensor[self.count : self.count + len(rows)] = rows.to(self.tensor.dtype).cpu()
        self.count += len(rows)


class CachingStopped(Exception):
    """A stop was asked for while features were computed: what was computed so far is dropped, its file deleted."""


@torch.no_grad()
def compute_features(
    adapter: ModelAdapter, dataset: Dataset, engine: Engine, *, batch_size: int, workers: int | None, budget: MemoryBudget,
    spill_path: Path, label: str, processes: Processes = SINGLE, augment_seed: int | None = None, entry: Entry | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> FeatureSet:
    """forward_features (with `entry`: the boundary's input) for every decodable sample (under several processes:
    this rank's shard), once, in eval mode. `augment_seed` fixes the random augmentation of an augmented view.
    Raises CachingStopped between batches once `should_stop` turns true: a pass over a large set takes minutes."""
    adapter.model.eval()
    forward = adapter.forward_features if entry is None else capture(adapter.model, entry)
    store, labels = None, []
    loader = make_loader(dataset, batch_size=batch_size, shuffle=False, seed=0, workers=workers, processes=processes, augment_seed=augment_seed)
    try:
        for batch in tqdm(loader, desc=label, disable=bars_disabled(engine.quiet), leave=False, unit="batch"):
            if should_stop():
                raise CachingStopped
            engine.note_failures(batch.failed)
            if not len(batch.labels):
                continue
            with engine.autocast():
                features = forward(engine.to_device(batch.images))
            if store is None:
                # Kept as computed (bf16 under bf16 autocast, else fp32): the head sees exactly what it would see live.
                store = _Store(len(dataset), tuple(features.shape[1:]), features.dtype, budget, spill_path)
            store.add(features)
            labels.append(batch.labels)
    except BaseException:  # a stop, a worker ended by SIGTERM, a second Ctrl-C: the rows so far go, with their file
        if store is not None:
            budget.give_back(store.reserved)
            spill, store = store.spill, None  # the last reference to the mapping first: a mapped file cannot be deleted on Windows
            if spill is not None:
                try:
                    spill.unlink(missing_ok=True)
                except OSError:  # still mapped (Windows) or the disk went away: the next run here removes it
                    pass
        raise
    if store is None:
        return FeatureSet(torch.empty(0), torch.empty(0, dtype=torch.long))
    return FeatureSet(store.tensor[: store.count], torch.cat(labels), store.budget, store.reserved, store.spill)


class FeatureBatches:
    """Batches over cached features, shuffled by a seed (the same per-epoch seed as images)."""

    def __init__(self, features: FeatureSet, batch_size: int, seed: int | None, dtype: torch.dtype | None, skip_batches: int = 0) -> None:
        self.features, self.batch_size, self.seed, self.dtype = features, batch_size, seed, dtype
        self.skip = skip_batches * batch_size

    def __len__(self) -> int:
        return (len(self.features.labels) - self.skip + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[Batch]:
        count = len(self.features.labels)
        order = torch.arange(count) if self.seed is None else torch.tensor(seeded_order(count, self.seed), dtype=torch.long)
        for start in range(self.skip, count, self.batch_size):
            index = order[start : start + self.batch_size]
            rows = self.features.features[index]
            yield Batch(rows if self.dtype is None else rows.to(self.dtype), self.features.labels[index], [])


@dataclass
class CachedStage:
    key: str
    train_views: list[FeatureSet]
    val: FeatureSet
    entry: Entry | None = None  # where the features are taken: None, the head's input

    def forward(self, adapter: ModelAdapter, model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """Cached features to logits: the head alone, or `model` (the weights or their average) from the boundary on."""
        return adapter.forward_head if self.entry is None else tail_forward(model, self.entry)

    def train_view(self, epoch: int) -> FeatureSet:
        return self.train_views[epoch % len(self.train_views)]

    def release(self) -> None:
        for features in [*self.train_views, self.val]:
            features.release()


def build_cache(
    adapter: ModelAdapter,
    key: str,
    make_dataset: Callable[[str], Dataset],
    views: int,
    engine: Engine,
    *,
    batch_size: int,
    workers: int | None,
    budget: MemoryBudget,
    folder: Path,
    seed: int,
    processes: Processes = SINGLE,
    entry: Entry | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> CachedStage:
    """Train features (the eval view, or `views` augmented views) and val features (eval view).

    Under several processes each rank computes only its shard; train shards are then padded to
    the same length (DistributedSampler does the same), so every rank takes as many steps.
    """
    options = {"batch_size": batch_size, "workers": workers, "budget": budget, "processes": processes, "entry": entry, "should_stop": should_stop}
    suffix = f"-rank{processes.rank}" if processes.distributed else ""
    train_views: list[FeatureSet] = []
    try:
        for view in range(max(1, views)):
            dataset = make_dataset("train" if views else "train-eval")
            features = compute_features(
                adapter, dataset, engine, spill_path=folder / f"{key}-train{view}{suffix}.npy", label=f"caching train view {view + 1}",
                augment_seed=seed * 7919 + view if views else None,  # each view fixed by its seed, so a resumed run sees the same
                **options,
            )
            train_views.append(_pad_to_longest_shard(features) if processes.distributed else features)
        val = compute_features(adapter, make_dataset("val"), engine, spill_path=folder / f"{key}-val{suffix}.npy", label="caching val", **options)
    except BaseException:  # stopped (or failed) part way: the views done before, nothing will read
        for features in train_views:
            features.release()
        raise
    return CachedStage(key, train_views, val, entry)


def _pad_to_longest_shard(features: FeatureSet) -> FeatureSet:
    import torch.distributed as dist

    longest = torch.tensor([len(features.labels)], device=collective_device())
    dist.all_reduce(longest, op=dist.ReduceOp.MAX)
    missing = int(longest) - len(features.labels)
    if missing <= 0 or not len(features.labels):
        return features
    extra = torch.arange(missing) % len(features.labels)  # repeat the first rows, as DistributedSampler pads
    padded = torch.cat([features.features, features.features[extra]])
    return FeatureSet(padded, torch.cat([features.labels, features.labels[extra]]), features.budget, features.reserved, features.spill)
