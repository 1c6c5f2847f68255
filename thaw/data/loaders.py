"""Datasets and DataLoaders: decode, transform, and report files that fail mid-run."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from thaw.data.folders import Sample
from thaw.data.images import UnreadableImage, load_rgb
from thaw.data.pixel_store import PixelStore, WorkerLoader, decode_at, ignore_interrupts
from thaw.data.transforms import NormaliseBatch, normalised_per_batch, starts_from_tensor
from thaw.distributed import SINGLE, Processes, ShardedPermutation, shard


@dataclass
class Batch:
    images: torch.Tensor | dict[str, torch.Tensor]  # a text batch holds the tokenizer's tensors
    labels: torch.Tensor
    failed: list[tuple[str, str]]  # files that passed the header check but did not decode

    def pin_memory(self) -> Batch:
        """Page-locked copies (DataLoader's pin_memory calls this), so the copy to the GPU overlaps compute."""
        images = {k: v.pin_memory() for k, v in self.images.items()} if isinstance(self.images, dict) else self.images.pin_memory()
        return Batch(images, self.labels.pin_memory(), self.failed)


class ImageDataset(Dataset):
    """Labelled images through `transform`: decoded from their files, or read from a run's PixelStore.

    Where `transform` ends as eval_transform and train_transform do, an item is its uint8 image and the loader's
    collate (make_loader) does the normalisation for the whole batch (`normalise`): the same values, less work.
    A loader over a wrapper of this dataset (a Subset, say) must pass `normalise` on. A transform that starts from
    a tensor gets the store's own memory, as PixelStore.pixels does: it must not write into its input."""

    def __init__(
        self, samples: tuple[Sample, ...], transform: Callable, draft_size: int | None = None, store: PixelStore | None = None,
        transform_at: Callable[[int], Callable] | None = None,
    ) -> None:
        self.samples = samples
        self.transform, self.normalise = normalised_per_batch(transform)
        self.draft_size = draft_size
        self.store = store
        self.transform_at = transform_at  # the transform for another crop size (progressive resizing), where it has one
        self.sized: dict[int, Callable] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int] | tuple[int, int, int]) -> tuple[torch.Tensor | None, int, tuple[str, str] | None]:
        """`key` is an index, or (index, augmentation seed) or (index, seed, crop size) from AugmentationSeeds."""
        index, seed, size = (key + (None,))[:3] if isinstance(key, tuple) else (key, None, None)
        transform = self.transform if size is None else self._transform_at(size)
        path, label = self.samples[index]
        try:
            image = self._read(path, starts_from_tensor(transform))
        except UnreadableImage as reason:
            return None, label, (str(path), str(reason))
        if seed is None:
            return transform(image), label, None
        with torch.random.fork_rng(devices=[]):  # the caller's random stream (dropout, say) is left as it was
            # The CPU generator only: torch.manual_seed would also reseed every GPU's generator (the run's dropout
            # stream there) and, with CUDA not started, capture a Python stack trace on every call.
            torch.default_generator.manual_seed(seed)
            return transform(image), label, None

    def _read(self, path: Path, as_tensor: bool) -> Image.Image | torch.Tensor:
        """The decoded image, as a Pillow image or (for a transform that starts from a tensor) 3xHxW uint8 pixels.
        Not in the store when the run reads each image once (it is not filled): the file gives the same pixels."""
        stored = self.store is not None and path in self.store
        if not as_tensor:
            return self.store.image(path) if stored else load_rgb(path, self.draft_size)
        pixels = self.store.pixels(path) if stored else torch.from_numpy(decode_at(path, self.draft_size))
        return pixels.permute(2, 0, 1)

    def _transform_at(self, size: int) -> Callable:
        if self.transform_at is None:
            raise ValueError("this dataset has one crop size (progressive resizing needs ImageDataset(transform_at=...))")
        if size not in self.sized:
            transform, normalise = normalised_per_batch(self.transform_at(size))
            if normalise != self.normalise:  # collate normalises every batch one way
                raise ValueError("transform_at must end as the dataset's transform does (the same normalisation)")
            self.sized[size] = transform
        return self.sized[size]


def collate(items: list[tuple[torch.Tensor | None, int, tuple[str, str] | None]], normalise: NormaliseBatch | None = None) -> Batch:
    good = [(image, label) for image, label, _ in items if image is not None]
    failed = [failure for _, _, failure in items if failure is not None]
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), failed)
    images = [image for image, _ in good]
    stacked = torch.stack(images) if normalise is None else normalise(images)
    return Batch(stacked, torch.tensor([label for _, label in good]), failed)


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


class AugmentationSeeds(Sampler[tuple]):
    """Pairs every index with its own augmentation seed (and the epoch's crop size, where it is not the dataset's).

    A sample's random crop then depends only on (seed, index), not on which
    worker process decodes it, how many came before it there, or which rank
    holds it: a run resumed mid-epoch, or run with another number of workers,
    sees the same augmented images. The crop size travels with the index because
    persistent workers hold their own copy of the dataset, made when they started.
    """

    def __init__(self, indices: Sampler[int] | list[int], seed: int, size: int | None = None) -> None:
        self.indices, self.seed, self.size = indices, seed, size

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[tuple]:
        if self.size is None:
            return ((index, sample_seed(self.seed, index)) for index in self.indices)
        return ((index, sample_seed(self.seed, index), self.size) for index in self.indices)


def _sampler(
    count: int, shuffle: bool, seed: int, skip: int, processes: Processes, augment_seed: int | None, size: int | None = None
) -> Sampler | list[int] | range:
    """Single process: the seeded order (or none). Several: this rank's shard of it (evaluation: exact, unpadded).
    Shuffled orders carry per-sample augmentation seeds from the epoch's seed (and `size`, a crop size other than
    the dataset's); fixed orders from `augment_seed`."""
    if shuffle:
        order = ShardedPermutation(count, seed, processes, skip) if processes.distributed else SeededPermutation(count, seed, skip)
        return AugmentationSeeds(order, seed, size)
    order = shard(count, processes, pad=False) if processes.distributed else range(count)
    return order if augment_seed is None else AugmentationSeeds(order, augment_seed)


class EpochOrder(Sampler):
    """The sampler of a loader whose workers outlive an epoch: each epoch hands it that epoch's order."""

    def __init__(self, order: Sampler | list[int] | range) -> None:
        self.order = order

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator:
        return iter(self.order)


def next_epoch(
    loader: DataLoader, seed: int, skip_batches: int = 0, processes: Processes = SINGLE, size: int | None = None
) -> DataLoader:
    """`loader` (from make_loader(persistent=True), shuffled) set to the epoch of `seed`, its first batches skipped,
    its crops `size` px where given (the dataset must have transform_at)."""
    order = _sampler(len(loader.dataset), True, seed, skip_batches * loader.batch_size, processes, None, size)
    loader.sampler.order = order
    return loader


def stop_workers(*loaders: DataLoader | None) -> None:
    """End the worker processes of persistent loaders now, not when the last reference goes (a traceback,
    a notebook's last exception, may keep one alive and its workers with it)."""
    for loader in loaders:
        iterator = getattr(loader, "_iterator", None)  # where DataLoader keeps its persistent workers
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            workers = list(getattr(iterator, "_workers", ()))
            iterator._shutdown_workers()
            for worker in workers:  # stuck where it cannot take DataLoader's SIGTERM (native code holding the GIL)
                if worker.is_alive():
                    worker.kill()
                    worker.join(timeout=5)
        if loader is not None:
            loader._iterator = None


def make_loader(
    dataset: Dataset, *, batch_size: int, shuffle: bool, seed: int, workers: int | None = None, skip_batches: int = 0,
    processes: Processes = SINGLE, augment_seed: int | None = None, pin_memory: bool = False, persistent: bool = False,
) -> DataLoader:
    """Batches of `dataset` in a seeded order. `persistent`: the worker processes live on between epochs
    (decoded pixels stay where they are, no start-up per epoch); set each epoch's order with next_epoch()."""
    if hasattr(dataset, "batch_sampler"):  # text: tokenised up front, batched by length, padded per batch
        sampler = dataset.batch_sampler(batch_size, seed if shuffle else None, skip_batches, processes)
        return DataLoader(dataset, batch_sampler=sampler, num_workers=0, collate_fn=dataset.collate)
    workers = default_workers() if workers is None else workers
    generator = torch.Generator().manual_seed(seed)  # seeds the workers; augmentation has its own per-sample seeds
    order = _sampler(len(dataset), shuffle, seed, skip_batches * batch_size, processes, augment_seed)
    return WorkerLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochOrder(order) if persistent else order,
        num_workers=workers,
        collate_fn=partial(collate, normalise=getattr(dataset, "normalise", None)),
        generator=generator,
        persistent_workers=persistent and workers > 0,
        worker_init_fn=ignore_interrupts,
        pin_memory=pin_memory,
        drop_last=False,
    )
