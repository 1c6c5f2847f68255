"""Datasets and DataLoaders: decode, transform, and report files that fail mid-run."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset

from thaw.data.folders import Sample
from thaw.data.images import UnreadableImage, load_rgb


@dataclass
class Batch:
    images: torch.Tensor
    labels: torch.Tensor
    failed: list[tuple[str, str]]  # files that passed the header check but did not decode


class ImageDataset(Dataset):
    def __init__(self, samples: tuple[Sample, ...], transform: Callable, draft_size: int | None = None) -> None:
        self.samples = samples
        self.transform = transform
        self.draft_size = draft_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int, tuple[str, str] | None]:
        path, label = self.samples[index]
        try:
            image = load_rgb(path, self.draft_size)
        except UnreadableImage as reason:
            return None, label, (str(path), str(reason))
        return self.transform(image), label, None


def collate(items: list[tuple[torch.Tensor | None, int, tuple[str, str] | None]]) -> Batch:
    good = [(image, label) for image, label, _ in items if image is not None]
    failed = [failure for _, _, failure in items if failure is not None]
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), failed)
    return Batch(torch.stack([i for i, _ in good]), torch.tensor([label for _, label in good]), failed)


def default_workers() -> int:
    """Decoding workers that leave the compute threads a core each: none below 4 cores."""
    cores = os.cpu_count() or 1
    return 0 if cores < 4 else min(8, cores // 2)


def make_loader(
    dataset: Dataset, *, batch_size: int, shuffle: bool, seed: int, workers: int | None = None
) -> DataLoader:
    workers = default_workers() if workers is None else workers
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        collate_fn=collate,
        generator=generator,
        persistent_workers=False,
        drop_last=False,
    )
