"""Image transforms built from an adapter's Preprocessing, so inputs match the weights."""

from __future__ import annotations

from dataclasses import replace

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

from thaw.models.adapter import Preprocessing


def _interpolation(preprocessing: Preprocessing) -> InterpolationMode:
    return InterpolationMode(preprocessing.interpolation)


def _to_normalised_tensor(preprocessing: Preprocessing) -> list[v2.Transform]:
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(preprocessing.mean), std=list(preprocessing.std)),
    ]


def eval_transform(preprocessing: Preprocessing) -> v2.Compose:
    """Resize the short side, centre-crop, normalise: torchvision's own evaluation preset."""
    return v2.Compose(
        [
            v2.Resize(preprocessing.resize_size, interpolation=_interpolation(preprocessing), antialias=True),
            v2.CenterCrop(preprocessing.crop_size),
            *_to_normalised_tensor(preprocessing),
        ]
    )


# --auto-augment: torchvision's automatic augmentation policies, with the settings of its training references:
# TrivialAugmentWide (one random op at a random strength per image), RandAugment (two ops at strength 9).
POLICIES = {
    "trivial": lambda interpolation: v2.TrivialAugmentWide(interpolation=interpolation),
    "rand": lambda interpolation: v2.RandAugment(num_ops=2, magnitude=9, interpolation=interpolation),
}
AUTO_AUGMENTS = tuple(POLICIES)


def train_transform(preprocessing: Preprocessing, auto_augment: str | None = None) -> v2.Compose:
    """The standard fine-tuning augmentation: random resized crop and horizontal flip, then an
    automatic augmentation policy where one is named (after the crop, as torchvision's references do)."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(preprocessing.crop_size, interpolation=_interpolation(preprocessing), antialias=True),
            v2.RandomHorizontalFlip(),
            *([POLICIES[auto_augment](_interpolation(preprocessing))] if auto_augment else []),
            *_to_normalised_tensor(preprocessing),
        ]
    )


def train_transform_at(preprocessing: Preprocessing, crop_size: int, auto_augment: str | None = None) -> v2.Compose:
    """The training augmentation with crops of `crop_size` px (progressive resizing's smaller epochs)."""
    return train_transform(replace(preprocessing, crop_size=crop_size), auto_augment)
