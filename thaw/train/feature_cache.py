"""The frozen-feature cache: run the frozen part of the network once, train the head many times.

A stage qualifies when only the head trains and every BatchNorm before it is
eval-locked (policies frozen and eval), so the features cannot change between
epochs. The frozen part runs in eval mode (dropout and stochastic depth off),
as a frozen feature extractor should. Features are stored in half precision,
in memory up to a budget and in a memory-mapped file past it, keyed by a
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
from tqdm import tqdm

from torch.utils.data import Dataset

from thaw.data.loaders import Batch, make_loader, seeded_order
from thaw.distributed import SINGLE, Processes, collective_device
from thaw.models.adapter import ModelAdapter
from thaw.plan.freeze import batchnorm_layers, is_eval_locked
from thaw.train.loop import Engine


def why_not_cached(adapter: ModelAdapter, trainable: tuple[str, ...]) -> str | None:
    """None when a stage can train on cached features, else the reason it cannot."""
    head_modules = adapter.group("head").modules
    outside = [(n, m) for n, m in batchnorm_layers(adapter.model) if not any(n == h or n.startswith(h + ".") for h in head_modules)]
    bn_params = {f"{n}.{p}" for n, m in outside for p, _ in m.named_parameters()}
    extra = set(trainable) - set(adapter.group("head").params)
    if extra - bn_params:
        return "layers before the head train in this stage"
    for name, layer in outside:
        if not is_eval_locked(layer):
            return f"BatchNorm {name} updates its statistics (policy train), so features change every step"
    return None


def fingerprint(adapter: ModelAdapter, trainable: tuple[str, ...], preprocessing: object, samples: tuple[tuple[object, int], ...], views: str) -> str:
    """Everything that decides the features: frozen weights, what trains, preprocessing, views, the files."""
    digest = hashlib.sha256()
    description = {"head": adapter.head_name, "trainable": sorted(trainable), "preprocessing": asdict(preprocessing), "views": views, "torch": torch.__version__}
    digest.update(json.dumps(description, sort_keys=True).encode())
    head = set(adapter.group("head").params)
    for name, tensor in adapter.model.state_dict().items():
        if name not in head:
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    for item, label in samples:
        if isinstance(item, Path):  # an image file: its size and time stand for its content
            stat = item.stat()
            digest.update(f"{item}|{label}|{stat.st_size}|{stat.st_mtime_ns}".encode())
        else:  # a text sample is its own content
            digest.update(f"{label}|{len(item)}|{item}".encode())
    return digest.hexdigest()[:20]


@dataclass
class FeatureSet:
    features: torch.Tensor  # 16-bit, in memory or over a memory-mapped file
    labels: torch.Tensor


def storage_dtype(produced: torch.dtype) -> torch.dtype:
    """Half precision: bf16 features (bf16 autocast) stay bf16, so the head sees exactly what it would live."""
    return produced if produced in (torch.bfloat16, torch.float16) else torch.float16


class _Store:
    """Pre-allocated 16-bit rows, in memory or on disk past the budget."""

    def __init__(self, rows: int, shape: tuple[int, ...], dtype: torch.dtype, budget_bytes: int, spill_path: Path) -> None:
        if rows * int(np.prod(shape)) * 2 <= budget_bytes:
            self.tensor = torch.empty((rows, *shape), dtype=dtype)
        else:
            # numpy has no bfloat16: the file holds the raw 16-bit patterns.
            spill_path.parent.mkdir(parents=True, exist_ok=True)
            array = np.lib.format.open_memmap(spill_path, mode="w+", dtype=np.uint16, shape=(rows, *shape))
            self.tensor = torch.from_numpy(array).view(dtype)
        self.count = 0

    def add(self, rows: torch.Tensor) -> None:
        self.tensor[self.count : self.count + len(rows)] = rows.to(self.tensor.dtype).cpu()
        self.count += len(rows)


@torch.no_grad()
def compute_features(
    adapter: ModelAdapter, dataset: Dataset, engine: Engine, *, batch_size: int, workers: int | None, budget_bytes: int, spill_path: Path, label: str,
    processes: Processes = SINGLE, augment_seed: int | None = None,
) -> FeatureSet:
    """forward_features for every decodable sample (under several processes: this rank's shard), once, in eval mode.
    `augment_seed` fixes the random augmentation of an augmented view."""
    adapter.model.eval()
    store, labels = None, []
    loader = make_loader(dataset, batch_size=batch_size, shuffle=False, seed=0, workers=workers, processes=processes, augment_seed=augment_seed)
    for batch in tqdm(loader, desc=label, disable=engine.quiet, leave=False, unit="batch"):
        engine.note_failures(batch.failed)
        if not len(batch.labels):
            continue
        with engine.autocast():
            features = adapter.forward_features(engine.to_device(batch.images))
        if store is None:
            store = _Store(len(dataset), tuple(features.shape[1:]), storage_dtype(features.dtype), budget_bytes, spill_path)
        store.add(features)
        labels.append(batch.labels)
    if store is None:
        return FeatureSet(torch.empty(0, dtype=torch.float16), torch.empty(0, dtype=torch.long))
    return FeatureSet(store.tensor[: store.count], torch.cat(labels))


class FeatureBatches:
    """Batches over cached features, shuffled by a seed (the same per-epoch seed as images)."""

    def __init__(self, features: FeatureSet, batch_size: int, seed: int | None, dtype: torch.dtype, skip_batches: int = 0) -> None:
        self.features, self.batch_size, self.seed, self.dtype = features, batch_size, seed, dtype
        self.skip = skip_batches * batch_size

    def __len__(self) -> int:
        return (len(self.features.labels) - self.skip + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[Batch]:
        count = len(self.features.labels)
        order = torch.arange(count) if self.seed is None else torch.tensor(seeded_order(count, self.seed), dtype=torch.long)
        for start in range(self.skip, count, self.batch_size):
            index = order[start : start + self.batch_size]
            yield Batch(self.features.features[index].to(self.dtype), self.features.labels[index], [])


@dataclass
class CachedStage:
    key: str
    train_views: list[FeatureSet]
    val: FeatureSet

    def train_view(self, epoch: int) -> FeatureSet:
        return self.train_views[epoch % len(self.train_views)]


def build_cache(
    adapter: ModelAdapter,
    key: str,
    make_dataset: Callable[[str], Dataset],
    views: int,
    engine: Engine,
    *,
    batch_size: int,
    workers: int | None,
    budget_bytes: int,
    folder: Path,
    seed: int,
    processes: Processes = SINGLE,
) -> CachedStage:
    """Train features (the eval view, or `views` augmented views) and val features (eval view).

    Under several processes each rank computes only its shard; train shards are then padded to
    the same length (DistributedSampler does the same), so every rank takes as many steps.
    """
    options = {"batch_size": batch_size, "workers": workers, "budget_bytes": budget_bytes, "processes": processes}
    suffix = f"-rank{processes.rank}" if processes.distributed else ""
    train_views = []
    for view in range(max(1, views)):
        dataset = make_dataset("train" if views else "train-eval")
        features = compute_features(
            adapter, dataset, engine, spill_path=folder / f"{key}-train{view}{suffix}.npy", label=f"caching train view {view + 1}",
            augment_seed=seed * 7919 + view if views else None,  # each view fixed by its seed, so a resumed run sees the same
            **options,
        )
        train_views.append(_pad_to_longest_shard(features) if processes.distributed else features)
    val = compute_features(adapter, make_dataset("val"), engine, spill_path=folder / f"{key}-val{suffix}.npy", label="caching val", **options)
    return CachedStage(key, train_views, val)


def _pad_to_longest_shard(features: FeatureSet) -> FeatureSet:
    import torch.distributed as dist

    longest = torch.tensor([len(features.labels)], device=collective_device())
    dist.all_reduce(longest, op=dist.ReduceOp.MAX)
    missing = int(longest) - len(features.labels)
    if missing <= 0 or not len(features.labels):
        return features
    extra = torch.arange(missing) % len(features.labels)  # repeat the first rows, as DistributedSampler pads
    return FeatureSet(torch.cat([features.features, features.features[extra]]), torch.cat([features.labels, features.labels[extra]]))
