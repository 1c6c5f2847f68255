"""Mixup and cutmix: training batches blended pairwise, their labels in the same proportions.

torchvision's batch transforms do the blending (each image with its neighbour in the batch,
`roll(1)`), drawing the mixing weight from Beta(alpha, alpha). Their random draws are reseeded
for every batch from (the epoch's seed, the batch's number in the epoch), so a fixed seed repeats
exactly and a run resumed mid-epoch blends its remaining batches as the uninterrupted run does.
"""

from __future__ import annotations

from typing import Callable

import torch
from torchvision.transforms import v2

# (images, labels, index: the batch's in the loader) -> (blended images, soft targets: one row of class shares per image)
Mix = Callable[..., tuple[torch.Tensor, torch.Tensor]]
# Each (epoch seed, batch, rank) gets a seed of its own while batches number under BATCH_STRIDE and ranks under
# RANK_STRIDE; epoch seeds are below 2**31, so the products stay below 2**63 and the modulo never wraps.
BATCH_STRIDE = 2**20
RANK_STRIDE = 2**10


class BatchMixer:
    """Mixup (alpha `mixup`) and/or cutmix (alpha `cutmix`); with both, each batch takes one at random."""

    def __init__(self, num_classes: int, mixup: float, cutmix: float) -> None:
        choices: list[v2.Transform] = []
        if mixup:  # float: an int alpha (a plan file's `cutmix: 1`) was a Dirichlet of Long, a traceback in the first batch
            choices.append(v2.MixUp(alpha=float(mixup), num_classes=num_classes))
        if cutmix:
            choices.append(v2.CutMix(alpha=float(cutmix), num_classes=num_classes))
        if not choices:
            raise ValueError("BatchMixer needs mixup or cutmix above 0")
        self.transform = choices[0] if len(choices) == 1 else v2.RandomChoice(choices)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.random.fork_rng(devices=[]):  # the draws come from the CPU generator; the run's own stream is left as it was
            torch.default_generator.manual_seed(seed)
            return self.transform(images, labels)

    def for_epoch(self, epoch_seed: int, first_batch: int = 0, rank: int = 0) -> Mix:
        """The blending of one epoch whose loader starts at batch `first_batch` (a resumed epoch's), each batch
        seeded by its number counted from the epoch's start and by the rank (under torchrun every rank shares the
        epoch's seed; each blends its own shard with draws of its own, as separate batches would)."""

        def blend(images: torch.Tensor, labels: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
            batch = first_batch + index
            return self(images, labels, ((epoch_seed * BATCH_STRIDE + batch) * RANK_STRIDE + rank) % 2**63)

        return blend


def batch_mixer(num_classes: int, mixup: float, cutmix: float) -> BatchMixer | None:
    """The run's mixer, or None when both alphas are 0."""
    return BatchMixer(num_classes, mixup, cutmix) if mixup or cutmix else None
