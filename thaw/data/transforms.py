"""Image transforms built from an adapter's Preprocessing, so inputs match the weights."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

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
# On tensors torchvision rotates, shears and translates with nearest or bilinear sampling only (bicubic raises)
ON_TENSORS = (InterpolationMode.NEAREST, InterpolationMode.BILINEAR)


def _policy(name: str, preprocessing: Preprocessing) -> v2.Transform:
    """An auto-augment policy for the training crops (uint8 tensors): the weights' resampling where tensors have it,
    else bilinear (bicubic weights: timm's and some torchvision presets)."""
    interpolation = _interpolation(preprocessing)
    return POLICIES[name](interpolation if interpolation in ON_TENSORS else InterpolationMode.BILINEAR)


AUTO_AUGMENTS = tuple(POLICIES)


def train_transform(preprocessing: Preprocessing, auto_augment: str | None = None) -> v2.Compose:
    """The standard fine-tuning augmentation: random resized crop and horizontal flip, then an
    automatic augmentation policy where one is named (after the crop, as torchvision's references do).

    It works on uint8 tensors (a Pillow image is turned into one first): torch's uint8 resampling crops about 3x
    faster than Pillow's on a CPU and gives pixels within 2 levels of it (the same crop boxes: the random draws do
    not depend on the type). ImageDataset hands it the pixel store's uint8 pixels without making a Pillow image.
    The evaluation view stays on Pillow images: torchvision's preset, exactly as `thaw predict` computes it."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(preprocessing.crop_size, interpolation=_interpolation(preprocessing), antialias=True),
            v2.RandomHorizontalFlip(),
            *([_policy(auto_augment, preprocessing)] if auto_augment else []),
            *_to_normalised_tensor(preprocessing)[1:],
        ]
    )


def train_transform_at(preprocessing: Preprocessing, crop_size: int, auto_augment: str | None = None) -> v2.Compose:
    """The training augmentation with crops of `crop_size` px (progressive resizing's smaller epochs)."""
    return train_transform(replace(preprocessing, crop_size=crop_size), auto_augment)


@dataclass(frozen=True)
class NormaliseBatch:
    """The last two steps of the transforms above (ToDtype with scale, then Normalize) done to a whole batch of
    uint8 images at once, then laid out channels_last, as the model reads it.

    The same float32 arithmetic in the same order as those steps (x * (1/255), minus the mean, over the std), so
    the same values; a few passes over the batch instead of several small ones per image, and no transposed copy
    per image. Without worker processes (below 4 cores) the training process does this between its steps.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        if any(image.dtype != torch.uint8 for image in images):  # a transform that gave floats: ToDtype only casts them
            return torch.stack([self.one(image) for image in images]).as_subclass(torch.Tensor)
        mean, std = (torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1) for values in (self.mean, self.std))
        batch = torch.stack(images).as_subclass(torch.Tensor).to(torch.float32).mul_(1.0 / 255).sub_(mean).div_(std)
        return batch.contiguous(memory_format=torch.channels_last)

    def one(self, image: torch.Tensor) -> torch.Tensor:
        return v2.functional.normalize(v2.functional.to_dtype(image, torch.float32, scale=True), list(self.mean), list(self.std))


def normalised_per_batch(transform: Callable) -> tuple[Callable, NormaliseBatch | None]:
    """`transform` up to its uint8 image, and the normalisation its last steps did, for a whole batch; (transform,
    None) unless it makes a tensor (ToImage) and ends as the transforms above do (ToDtype float32 with scale,
    then Normalize)."""
    steps = list(getattr(transform, "transforms", ()))
    if len(steps) < 3 or not any(isinstance(step, v2.ToImage) for step in steps[:-2]):
        return transform, None
    to_dtype, normalize = steps[-2:]
    if not (isinstance(to_dtype, v2.ToDtype) and to_dtype.dtype is torch.float32 and to_dtype.scale and isinstance(normalize, v2.Normalize)):
        return transform, None
    return v2.Compose(steps[:-2]), NormaliseBatch(tuple(normalize.mean), tuple(normalize.std))


def starts_from_tensor(transform: Callable) -> bool:
    """Whether `transform` turns its input into a tensor first (train_transform): it can be given pixels directly."""
    steps = getattr(transform, "transforms", ())
    return bool(steps) and isinstance(steps[0], v2.ToImage)
