"""Batches are the images transformed one by one, exactly; training crops are cut from tensors, near Pillow's."""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from tests.conftest import write_class_images
from thaw.data.folders import discover
from thaw.data.images import load_rgb
from thaw.data.loaders import ImageDataset, collate, make_loader, sample_seed
from thaw.data.pixel_store import PixelStore, decode_at
from thaw.data.transforms import NormaliseBatch, eval_transform, normalised_per_batch, train_transform, train_transform_at
from thaw.models.adapter import Preprocessing
from thaw.train.loop import Engine

PRE = Preprocessing(resize_size=40, crop_size=32)
DRAFT = 2 * PRE.resize_size


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """Noise photos of several sizes: a crop box or a pixel out of place shows."""
    folder = tmp_path_factory.mktemp("transforms") / "data" / "noise"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for index, (height, width) in enumerate([(300, 420), (97, 61), (40, 40), (500, 130), (24, 30), (64, 200)]):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / f"{index}.jpg", quality=90)
    return tuple((path, 0) for path in sorted(folder.iterdir()))


def loader_images(dataset: ImageDataset, shuffle: bool) -> torch.Tensor:
    batches = make_loader(dataset, batch_size=4, shuffle=shuffle, seed=5, workers=0)
    return torch.cat([batch.images for batch in batches])


def one_by_one(samples: tuple, transform, seeds: list[int] | None) -> torch.Tensor:
    """What torchvision's transform gives each Pillow image alone, stacked."""
    images = []
    for index, (path, _) in enumerate(samples):
        if seeds is not None:
            torch.manual_seed(seeds[index])
        images.append(transform(load_rgb(path, DRAFT)))
    return torch.stack(images)


def test_the_evaluation_batch_is_exactly_the_images_transformed_one_by_one(samples: tuple) -> None:
    batch = loader_images(ImageDataset(samples, eval_transform(PRE), DRAFT), shuffle=False)
    assert torch.equal(batch, one_by_one(samples, eval_transform(PRE), None))
    assert batch.is_contiguous(memory_format=torch.channels_last)  # the layout a channels_last model reads


def filled_store(samples: tuple, folder: Path) -> PixelStore:
    store = PixelStore(DRAFT, 2**30, folder / "pixels.u8")
    assert store.fill([path for path, _ in samples], 0)
    return store


def test_the_training_batch_is_exactly_the_images_augmented_one_by_one(
    samples: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store's pixels handed over as a tensor (no Pillow image made) and normalised per batch: the same floats
    as train_transform on each Pillow image under the sample's seed."""
    store = filled_store(samples, tmp_path)
    monkeypatch.setattr(PixelStore, "image", lambda *_: pytest.fail("a Pillow image was made for a training crop"))
    dataset = ImageDataset(samples, train_transform(PRE), DRAFT, store)
    assert dataset.normalise is not None  # collate normalises whole batches
    order = [index for batch in make_loader(dataset, batch_size=4, shuffle=True, seed=5, workers=0).batch_sampler for index, _ in batch]
    expected = one_by_one(tuple(samples[i] for i in order), train_transform(PRE), [sample_seed(5, i) for i in order])
    assert torch.equal(loader_images(dataset, shuffle=True), expected)


def test_training_crops_are_cut_where_pillow_cuts_them_within_two_levels(samples: tuple) -> None:
    """The crop boxes are Pillow's own (the same random draws); torch resamples within 2 levels of Pillow."""
    on_pillow = v2.Compose([v2.RandomResizedCrop(PRE.crop_size, antialias=True), v2.RandomHorizontalFlip(), v2.ToImage()])
    on_tensors, _ = normalised_per_batch(train_transform(PRE))
    for seed, (path, _) in enumerate(samples * 5):
        torch.manual_seed(seed)
        reference = on_pillow(load_rgb(path, DRAFT))
        torch.manual_seed(seed)
        cropped = on_tensors(torch.from_numpy(decode_at(path, DRAFT)).permute(2, 0, 1))
        assert cropped.dtype == torch.uint8 and cropped.shape == reference.shape
        assert (cropped.int() - reference.int()).abs().max() <= 2, path.name


def test_training_never_writes_into_the_stored_pixels(samples: tuple, tmp_path: Path) -> None:
    """The dataset hands the store's own memory to the transforms: after epochs of crops and flips it is unchanged."""
    store = filled_store(samples, tmp_path)
    dataset = ImageDataset(samples, train_transform(PRE, "trivial"), DRAFT, store)
    for seed in range(3):
        for _ in make_loader(dataset, batch_size=4, shuffle=True, seed=seed, workers=0):
            pass
    for path, _ in samples:
        assert torch.equal(store.pixels(path), torch.from_numpy(decode_at(path, DRAFT))), path.name


def test_a_transform_of_its_own_is_applied_per_image_as_given(tmp_path: Path) -> None:
    """A user's transform that does not end as thaw's do keeps its own output: no normalisation added or lost."""
    samples = discover(write_class_images(tmp_path / "data", per_class=3, size=32)).train
    own = v2.Compose([v2.ToImage(), v2.CenterCrop(16), v2.ToDtype(torch.float32, scale=True)])
    assert normalised_per_batch(own) == (own, None)
    batch = loader_images(ImageDataset(samples, own), shuffle=False)
    assert torch.equal(batch, torch.stack([own(load_rgb(path)) for path, _ in samples]))


@pytest.mark.parametrize("channels_last", [True, False])
def test_the_engine_gives_the_model_the_layout_it_runs_in(channels_last: bool) -> None:
    """Batches come channels_last; a model without it (--no-channels-last, no convolution) gets the usual layout."""
    batch = torch.rand(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    moved = Engine(torch.device("cpu"), bf16=False, channels_last=channels_last).to_device(batch)
    assert torch.equal(moved, batch)
    assert moved.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_progressive_resizing_crops_are_normalised_per_batch_too(samples: tuple) -> None:
    dataset = ImageDataset(samples, train_transform(PRE), DRAFT, transform_at=partial(train_transform_at, PRE))
    keys = [(index, 10 + index, 24) for index in range(len(samples))]  # (sample, seed, crop size), as the sampler gives
    batch = collate([dataset[key] for key in keys], dataset.normalise).images
    assert torch.equal(batch, one_by_one(samples, train_transform_at(PRE, 24), [seed for _, seed, _ in keys]))


def test_a_smaller_crop_that_normalises_otherwise_is_refused(samples: tuple) -> None:
    other = partial(train_transform_at, replace(PRE, mean=(0.5, 0.5, 0.5)))
    dataset = ImageDataset(samples, train_transform(PRE), DRAFT, transform_at=other)
    with pytest.raises(ValueError, match="the same normalisation"):
        dataset[(0, 1, 24)]


def test_float_images_are_normalised_as_torchvisions_steps_do() -> None:
    """A transform that already gave floats: ToDtype leaves them as they are, Normalize does the rest."""
    steps = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(PRE.mean), std=list(PRE.std))])
    images = [torch.rand(3, 8, 8) for _ in range(3)]
    assert torch.equal(NormaliseBatch(PRE.mean, PRE.std)(images), torch.stack([steps(image) for image in images]))


@pytest.mark.parametrize("policy", [None, "trivial", "rand"])
def test_bicubic_weights_train_on_tensor_crops_with_every_policy(samples: tuple, policy: str | None) -> None:
    """timm's weights (and some torchvision presets) resample bicubic: torchvision rotates tensors with nearest or
    bilinear only, so a policy there samples bilinear, and no epoch stops on an operation it drew."""
    bicubic = replace(PRE, interpolation="bicubic")
    dataset = ImageDataset(samples * 4, train_transform(bicubic, policy), DRAFT)
    for seed in range(3):
        for batch in make_loader(dataset, batch_size=8, shuffle=True, seed=seed, workers=0):
            assert batch.images.shape[1:] == (3, PRE.crop_size, PRE.crop_size) and torch.isfinite(batch.images).all()
