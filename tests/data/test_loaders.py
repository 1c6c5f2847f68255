"""Augmented batches depend on the seed and the sample only: not on workers, skipping or ranks."""

from __future__ import annotations


import pytest
import torch

from tests.conftest import write_class_images
from thaw.data.folders import discover
from thaw.data.loaders import ImageDataset, make_loader, next_epoch, stop_workers
from thaw.data.transforms import train_transform
from thaw.models.adapter import Preprocessing

PRE = Preprocessing(resize_size=40, crop_size=32)


@pytest.fixture(scope="module")
def augmented(tmp_path_factory: pytest.TempPathFactory) -> ImageDataset:
    root = write_class_images(tmp_path_factory.mktemp("loaders") / "data", per_class=6, size=40)
    return ImageDataset(discover(root, val_split=0.2).train, train_transform(PRE))


def epoch(dataset: ImageDataset, workers: int, skip_batches: int = 0, seed: int = 7) -> torch.Tensor:
    loader = make_loader(dataset, batch_size=4, shuffle=True, seed=seed, workers=workers, skip_batches=skip_batches)
    return torch.cat([batch.images for batch in loader])


def test_an_epoch_is_the_same_with_or_without_worker_processes(augmented: ImageDataset) -> None:
    assert torch.equal(epoch(augmented, workers=0), epoch(augmented, workers=2))


def test_skipped_batches_leave_the_rest_of_the_epoch_unchanged(augmented: ImageDataset) -> None:
    whole = epoch(augmented, workers=2)
    assert torch.equal(epoch(augmented, workers=2, skip_batches=2), whole[8:])  # a mid-epoch resume sees the same images


def test_epochs_draw_new_augmentations(augmented: ImageDataset) -> None:
    assert not torch.equal(epoch(augmented, workers=0, seed=1), epoch(augmented, workers=0, seed=2))


def test_augmentation_leaves_the_global_random_stream_alone(augmented: ImageDataset) -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    epoch(augmented, workers=0)
    assert torch.equal(torch.rand(3), expected)  # dropout draws the same masks, however many images were augmented


def test_a_fixed_order_with_a_view_seed_repeats_and_views_differ(augmented: ImageDataset) -> None:
    def view(seed: int, workers: int) -> torch.Tensor:
        loader = make_loader(augmented, batch_size=4, shuffle=False, seed=0, workers=workers, augment_seed=seed)
        return torch.cat([batch.images for batch in loader])

    assert torch.equal(view(1, workers=0), view(1, workers=2))
    assert not torch.equal(view(1, workers=2), view(2, workers=2))  # cached views are different augmentations


def test_a_persistent_loader_gives_each_epoch_what_a_fresh_loader_gives(augmented: ImageDataset) -> None:
    """The run keeps one training loader: the same worker processes every epoch, and each epoch (and a mid-epoch
    resume) sees the batches a fresh loader gives."""
    kept = make_loader(augmented, batch_size=4, shuffle=True, seed=1, workers=2, persistent=True)
    workers = []
    try:
        for seed, skip in ((7, 0), (8, 0), (7, 2)):
            batches = torch.cat([batch.images for batch in next_epoch(kept, seed, skip)])
            assert torch.equal(batches, epoch(augmented, workers=0, seed=seed, skip_batches=skip))
            workers.append([process.pid for process in kept._iterator._workers])  # where DataLoader keeps them
        processes = kept._iterator._workers
    finally:
        stop_workers(kept)
    assert workers[0] == workers[1] == workers[2] and len(workers[0]) == 2
    assert not any(process.is_alive() for process in processes)
