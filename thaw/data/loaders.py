"""Datasets and DataLoaders: decode, transform, and report files that fail mid-run."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from thaw.data.folders import Sample
from thaw.data.images import UnreadableImage, load_rgb
from thaw.distributed import SINGLE, Processes, ShardedPermutation, shard


@dataclass
class Batch:
    images: torch.Tensor | dict[str, torch.Tensor]  # a text batch holds the tokenizer's tensors
    labels: torch.Tensor
    failed: list[tuple[str, str]]  # files that passed the header check but did not decode


class DecodedImages:
    """Images kept decoded in memory (up to a budget), so later epochs skip decoding.

    The images are kept exactly as first decoded, so results do not depend on
    the budget. Worker processes keep their own copies, which die with them:
    the store pays off with in-process loading (workers=0, the default below 4 cores).
    """

    def __init__(self, budget_bytes: int) -> None:
        self.images: dict[Path, Image.Image] = {}
        self.budget, self.used = budget_bytes, 0

    def load(self, path: Path, draft_size: int | None) -> Image.Image:
        image = self.images.get(path)
        if image is None:
            image = load_rgb(path, draft_size)
            size = image.width * image.height * 3
            if self.used + size <= self.budget:
                self.images[path], self.used = image, self.used + size
        return image


class ImageDataset(Dataset):
    def __init__(
        self, samples: tuple[Sample, ...], transform: Callable, draft_size: int | None = None, decoded: DecodedImages | None = None
    ) -> None:
        self.samples = samples
        self.transform = transform
        self.draft_size = draft_size
        self.decoded = decoded

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor | None, int, tuple[str, str] | None]:
        """`key` is an index, or (index, augmentation seed) from AugmentationSeeds."""
        index, seed = key if isinstance(key, tuple) else (key, None)
        path, label = self.samples[index]
        try:
            image = self.decoded.load(path, self.draft_size) if self.decoded else load_rgb(path, self.draft_size)
        except UnreadableImage as reason:
            return None, label, (str(path), str(reason))
        if seed is None:
            return self.transform(image), label, None
        with torch.random.fork_rng(devices=[]):  # the caller's random stream (dropout, say) is left as it was
            torch.manual_seed(seed)
            return self.transform(image), label, None


def collate(items: list[tuple[torch.Tensor | None, int, tuple[str, str] | None]]) -> Batch:
    good = [(image, label) for image, label, _ in items if image is not None]
    failed = [failure for _, _, failure in items if failure is not None]
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), failed)
    return Batch(torch.stack([i for i, _ in good]), torch.tensor([label for _, label in good]), failed)


def cores_per_process() -> int:
    """This process's share of the machine's cores (torchrun's processes on one machine split them)."""
    return max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def default_workers() -> int:
    """Decoding workers that leave the compute threads a core each: none below 4 cores."""
    cores = cores_per_process()
    return 0 if cores < 4 else min(8, cores // 2)


def configure_threads(workers: int) -> None:
    """Compute threads plus decoding workers never exceed this process's share of the cores
    (2 workers + 2 threads fight on 2 cores; torchrun's processes on one machine split them)."""
    torch.set_num_threads(max(1, cores_per_process() - workers))


def seeded_order(count: int, seed: int) -> list[int]:
    """The shuffled order for one epoch; image batches and cached-feature batches share it."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()


class SeededPermutation(Sampler[int]):
    """One epoch's seeded order; `skip` drops its first samples, to resume mid-epoch."""

    def __init__(self, count: int, seed: int, skip: int = 0) -> None:
        self.count, self.seed, self.skip = count, seed, skip

    def __len__(self) -> int:
        return max(0, self.count - self.skip)

    def __iter__(self) -> Iterator[int]:
        return iter(seeded_order(self.count, self.seed)[self.skip :])


def sample_seed(seed: int, index: int) -> int:
    """The augmentation seed of sample `index` under `seed` (an epoch's, or a cached view's)."""
    return (seed * 1_000_003 + index * 7_919) % 2**62


class AugmentationSeeds(Sampler[tuple[int, int]]):
    """Pairs every index with its own augmentation seed.

    A sample's random crop then depends only on (seed, index), not on which
    worker process decodes it, how many came before it there, or which rank
    holds it: a run resumed mid-epoch, or run with another number of workers,
    sees the same augmented images.
    """

    def __init__(self, indices: Sampler[int] | list[int], seed: int) -> None:
        self.indices, self.seed = indices, seed

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((index, sample_seed(self.seed, index)) for index in self.indices)


def _sampler(
    count: int, shuffle: bool, seed: int, skip: int, processes: Processes, augment_seed: int | None
) -> Sampler | list[int] | range:
    """Single process: the seeded order (or none). Several: this rank's shard of it (evaluation: exact, unpadded).
    Shuffled orders carry per-sample augmentation seeds from the epoch's seed; fixed orders from `augment_seed`."""
    if shuffle:
        order = ShardedPermutation(count, seed, processes, skip) if processes.distributed else SeededPermutation(count, seed, skip)
        return AugmentationSeeds(order, seed)
    order = shard(count, processes, pad=False) if processes.distributed else range(count)
    return order if augment_seed is None else AugmentationSeeds(order, augment_seed)


def make_loader(
    dataset: Dataset, *, batch_size: int, shuffle: bool, seed: int, workers: int | None = None, skip_batches: int = 0,
    processes: Processes = SINGLE, augment_seed: int | None = None,
) -> DataLoader:
    if hasattr(dataset, "batch_sampler"):  # text: tokenised up front, batched by length, padded per batch
        sampler = dataset.batch_sampler(batch_size, seed if shuffle else None, skip_batches, processes)
        return DataLoader(dataset, batch_sampler=sampler, num_workers=0, collate_fn=dataset.collate)
    workers = default_workers() if workers is None else workers
    generator = torch.Generator().manual_seed(seed)  # seeds the workers; augmentation has its own per-sample seeds
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=_sampler(len(dataset), shuffle, seed, skip_batches * batch_size, processes, augment_seed),
        num_workers=workers,
        collate_fn=collate,
        generator=generator,
        persistent_workers=False,
        drop_last=False,
    )
