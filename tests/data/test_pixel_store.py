"""The decoded-pixel store: one decode per image per run, every view exact, the budget invisible in results."""

from __future__ import annotations

import importlib
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import thaw.data.loaders as loaders
import thaw.data.pixel_store as pixel_store
from tests.conftest import Crash, crash_after, write_class_images
from thaw.data.images import UnreadableImage, load_rgb
from thaw.data.pixel_store import PixelStore
from thaw.data.transforms import eval_transform, train_transform
from thaw.errors import ThawError
from thaw.models.adapter import Preprocessing
from thaw.plan import ConstantLr, Plan, RangeLr, Stage
from thaw.train import TrainConfig, resume_run, train_images

fit = importlib.import_module("thaw.train.fit")  # the module: thaw.train's `fit` is the function
PRE = Preprocessing(resize_size=40, crop_size=32)
PLAN = Plan((Stage("head", 1, ("head",), ConstantLr(3e-3)), Stage("all", 2, ("all",), RangeLr(1e-4, 1e-3), batchnorm="eval")))
SPILL = Path("feature-cache") / "pixels-rank0.u8"  # in the run folder


def photos(folder: Path) -> list[Path]:
    """JPEGs large enough to be drafted, odd aspect ratios, one smaller than the short side, a PNG with alpha,
    and one rotated by its EXIF tag."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for index, (height, width) in enumerate([(300, 420), (97, 61), (40, 40), (500, 130), (24, 30)]):
        path = folder / f"{index}.jpg"
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(path)
    rgba = rng.integers(0, 255, (50, 70, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(folder / "alpha.png")
    rotated = Image.fromarray(rng.integers(0, 255, (60, 90, 3), dtype=np.uint8))
    exif = rotated.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    rotated.save(folder / "rotated.jpg", exif=exif)
    return [*paths, folder / "alpha.png", folder / "rotated.jpg"]


def filled(paths: list[Path], tmp_path: Path, budget: int = 2**30, workers: int = 0) -> PixelStore:
    store = PixelStore(2 * PRE.resize_size, budget, tmp_path / "spill" / "pixels.u8")
    assert store.fill(paths, workers)
    return store


def pixels(store: PixelStore, path: Path) -> torch.Tensor:
    return torch.from_numpy(np.array(store.image(path))).permute(2, 0, 1)


def test_the_evaluation_view_from_the_store_is_exactly_the_one_decoded_from_the_file(tmp_path: Path) -> None:
    paths = photos(tmp_path / "images")
    store = filled(paths, tmp_path)
    view = eval_transform(PRE)
    for path in paths:
        assert torch.equal(view(store.image(path)), view(load_rgb(path, 2 * PRE.resize_size))), path.name


def test_stored_images_are_the_decoded_files_upright(tmp_path: Path) -> None:
    paths = photos(tmp_path / "images")
    store = filled(paths, tmp_path)
    for path in paths:
        assert torch.equal(pixels(store, path), torch.from_numpy(np.array(load_rgb(path, 2 * PRE.resize_size))).permute(2, 0, 1))
    height, width = pixels(store, tmp_path / "images" / "rotated.jpg").shape[1:]
    assert height > width  # a 90x60 landscape file tagged "rotate 90": stored as the upright portrait


def test_pixels_past_the_budget_go_to_disk_and_read_back_the_same(tmp_path: Path) -> None:
    paths = photos(tmp_path / "images")
    in_memory = filled(paths, tmp_path / "a")
    budget = pixels(in_memory, paths[0]).numel() + 1  # room for the first image only
    split = filled(paths, tmp_path / "b", budget=budget)
    assert split.used <= budget and split.spilled > 0 and split.spill_path.is_file()
    assert len(split.in_memory) == 1 and len(split.on_disk) == len(paths) - 1
    for path in paths:
        assert torch.equal(pixels(split, path), pixels(in_memory, path))
    split.release()
    assert not split.spill_path.exists()


def test_decoding_workers_store_the_same_pixels(tmp_path: Path) -> None:
    paths = photos(tmp_path / "images")
    alone, with_workers = filled(paths, tmp_path / "a"), filled(paths, tmp_path / "b", budget=0, workers=2)
    assert all(torch.equal(pixels(alone, path), pixels(with_workers, path)) for path in paths)


def test_a_fill_asked_to_stop_stops_and_keeps_what_it_decoded(tmp_path: Path) -> None:
    paths = photos(tmp_path / "images")
    store = PixelStore(2 * PRE.resize_size, 2**30, tmp_path / "pixels.u8")
    decoded: list[int] = []
    assert not store.fill(paths, 0, should_stop=lambda: decoded.append(1) or len(decoded) > 2)
    assert len(store.in_memory) == 2


def test_a_file_that_does_not_decode_is_reported_on_every_read(tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    store = filled([broken], tmp_path)
    with pytest.raises(UnreadableImage):
        store.image(broken)
    dataset = loaders.ImageDataset(((broken, 0),), eval_transform(PRE), store=store)
    for _ in range(2):
        image, _, failure = dataset[0]
        assert image is None and failure[0] == str(broken)


def test_a_stale_spill_file_is_overwritten_not_appended_to(tmp_path: Path) -> None:
    paths = photos(tmp_path / "images")
    spill = tmp_path / "spill" / "pixels.u8"
    spill.parent.mkdir()
    spill.write_bytes(b"left by a killed run" * 100)
    store = filled(paths, tmp_path, budget=0)
    assert spill.stat().st_size == store.spilled == sum(pixels(store, p).numel() for p in paths)


def test_a_spill_file_that_cannot_be_written_is_one_clear_error(tmp_path: Path) -> None:
    paths = photos(tmp_path / "images")
    (tmp_path / "spill" / "pixels.u8").mkdir(parents=True)  # what a full or read-only disk looks like to open()
    with pytest.raises(ThawError, match="free disk space there, or give the run more memory"):
        filled(paths, tmp_path, budget=0)


def test_training_crops_from_the_store_are_exactly_those_from_the_file(tmp_path: Path) -> None:
    paths = photos(tmp_path / "images")
    store = filled(paths, tmp_path)
    augment = train_transform(PRE)
    for path in paths:
        torch.manual_seed(3)
        from_store = augment(store.image(path))
        torch.manual_seed(3)
        assert torch.equal(from_store, augment(load_rgb(path, 2 * PRE.resize_size))), path.name


def test_training_items_from_the_stored_pixels_are_exactly_the_crops_of_the_file(tmp_path: Path) -> None:
    """What training reads: the store's pixels as a tensor (no Pillow image), EXIF rotation and alpha included."""
    paths = photos(tmp_path / "images")
    samples = tuple((path, 0) for path in paths)
    stored = loaders.ImageDataset(samples, train_transform(PRE), 2 * PRE.resize_size, filled(paths, tmp_path))
    augment = train_transform(PRE)
    for index, path in enumerate(paths):
        torch.manual_seed(3)
        expected = augment(load_rgb(path, 2 * PRE.resize_size))
        image, _, failure = stored[(index, 3)]
        assert failure is None and torch.equal(stored.normalise([image]), expected.unsqueeze(0)), path.name


def count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    decoded: list[Path] = []

    def counting(path: Path, draft_size: int | None = None):
        decoded.append(path)
        return load_rgb(path, draft_size)

    monkeypatch.setattr(pixel_store, "load_rgb", counting)
    monkeypatch.setattr(loaders, "load_rgb", counting)
    return decoded


def colours(root: Path) -> Path:
    write_class_images(root / "train", per_class=8, size=48)
    write_class_images(root / "val", per_class=4, size=48, seed=1)
    return root


def train(data: Path, out: Path, callbacks: list | None = None, **fields) -> dict[str, torch.Tensor]:
    config = TrainConfig(image_size=32, batch_size=8, quiet=True, **fields)
    train_images(data, model="mobilenet_v3_small", weights=None, plan=PLAN, config=config, out=out, callbacks=callbacks)
    return torch.load(out / "checkpoint.pt", weights_only=True)["model"]


def spill_seen(out: Path, seen: list[bool]):
    return lambda state: seen.append((out / SPILL).is_file())


def test_a_run_decodes_each_image_once_and_deletes_its_spill_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = colours(tmp_path / "data")
    decoded, seen = count_decodes(monkeypatch), []
    monkeypatch.setattr(fit, "cores_per_process", lambda: 1)  # decode in this process, where the count is seen
    # every image on disk: three epochs, a cache pass, val after each epoch
    train(data, tmp_path / "run", [spill_seen(tmp_path / "run", seen)], decoded_memory_gb=0.0, workers=0)
    assert sorted(decoded) == sorted(data.rglob("*.png"))
    assert seen == [True, True, True]  # the pixels were on disk while the run trained
    assert not (tmp_path / "run" / "feature-cache").exists()


def test_a_run_that_reads_each_image_once_keeps_no_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Feature extraction caches the evaluation view once: each file is decoded once, with no pixels kept or spilled."""
    data = colours(tmp_path / "data")
    decoded, seen = count_decodes(monkeypatch), []
    config = TrainConfig(image_size=32, batch_size=8, quiet=True, workers=0, decoded_memory_gb=0.0)
    result = train_images(data, model="mobilenet_v3_small", weights=None, plan=Plan((PLAN.stages[0],)), config=config,
                          out=tmp_path / "run", callbacks=[spill_seen(tmp_path / "run", seen)])
    assert sorted(decoded) == sorted(data.rglob("*.png"))
    assert seen == [False] and result.decode_s == 0.0


def test_a_top_stage_sent_back_to_the_images_still_decodes_each_image_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A top stage is predicted to train on the frozen bottom's cached output; where its entry check fails it runs
    the network every epoch, and reads the pixels decoded before the run instead of the files."""
    data = colours(tmp_path / "data")
    decoded = count_decodes(monkeypatch)
    monkeypatch.setattr(fit, "cores_per_process", lambda: 1)  # decode in this process, where the count is seen
    monkeypatch.setattr(fit.Trainer, "prefix_entry", lambda self, trainable, statistics_move: "the entered network disagrees")
    plan = Plan((PLAN.stages[0], Stage("top2", 2, ("-2:",), ConstantLr(1e-3), batchnorm="eval")))
    config = TrainConfig(image_size=32, batch_size=8, quiet=True, workers=0)
    result = train_images(data, model="mobilenet_v3_small", weights=None, plan=plan, config=config, out=tmp_path / "run")
    assert [row["cached"] for row in result.history] == [True, False, False]
    assert sorted(decoded) == sorted(data.rglob("*.png"))


@pytest.mark.parametrize("workers", [0, 2])
def test_the_memory_budget_never_changes_the_trained_weights(tmp_path: Path, workers: int) -> None:
    data = colours(tmp_path / "data")
    seen: list[bool] = []
    in_memory = train(data, tmp_path / "memory", workers=workers)
    on_disk = train(data, tmp_path / "disk", [spill_seen(tmp_path / "disk", seen)], decoded_memory_gb=0.0, workers=workers)
    assert all(seen)
    assert all(torch.equal(in_memory[name], on_disk[name]) for name in in_memory)


def test_a_crashed_run_leaves_no_spill_file(tmp_path: Path) -> None:
    data = colours(tmp_path / "data")
    with pytest.raises(Crash):
        train(data, tmp_path / "run", [crash_after(2)], decoded_memory_gb=0.0, workers=0)
    assert not (tmp_path / "run" / SPILL).exists()


def test_ctrl_c_while_decoding_stops_at_once_and_says_there_is_nothing_to_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = colours(tmp_path / "data")
    monkeypatch.setattr(fit, "cores_per_process", lambda: 1)  # decode in this process, where Ctrl-C lands
    decoded: list[Path] = []

    def interrupted(path: Path, draft_size: int | None = None):
        decoded.append(path)
        if len(decoded) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does; the run's handler takes it
        return load_rgb(path, draft_size)

    monkeypatch.setattr(pixel_store, "load_rgb", interrupted)
    with pytest.raises(fit.RunInterrupted, match="before training began: nothing to resume"):
        train(data, tmp_path / "run", workers=0)
    assert len(decoded) < 5 and not (tmp_path / "run" / "checkpoint.pt").exists()
    # a resumed run stopped the same way keeps its checkpoint, and says so
    monkeypatch.setattr(pixel_store, "load_rgb", load_rgb)
    with pytest.raises(Crash):
        train(data, tmp_path / "cut", [crash_after(1)], workers=0)
    decoded.clear()
    monkeypatch.setattr(pixel_store, "load_rgb", interrupted)
    with pytest.raises(fit.RunInterrupted, match=f"the checkpoint in {tmp_path / 'cut'} is intact: continue with thaw train --resume"):
        resume_run(tmp_path / "cut", workers=0)


def halves(paths: list[Path], tmp_path: Path) -> tuple[PixelStore, PixelStore]:
    """Two processes' stores on one machine: each decodes every other image into its own file."""
    stores = []
    for index in range(2):
        store = PixelStore(2 * PRE.resize_size, 2**30, tmp_path / "spill" / f"pixels-rank{index}.u8")
        assert store.fill(paths[index::2], 0, to_disk=True)
        stores.append(store)
    return stores[0], stores[1]


def test_processes_that_share_a_machine_read_each_others_images_exactly(tmp_path: Path) -> None:
    broken = tmp_path / "images" / "broken.jpg"
    paths = [*photos(tmp_path / "images"), broken]
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")  # decoded by the second process only
    first, second = halves(paths, tmp_path)
    assert first.used == second.used == 0 and first.spilled > 0  # their shares are in their files, not in memory
    assert first.adopt(second.shared()) and second.adopt(first.shared())
    for store in (first, second):
        assert store.fill(paths, 0, should_stop=lambda: True)  # nothing left to decode, so nothing to stop
        for path in paths[:-1]:
            assert torch.equal(pixels(store, path), torch.from_numpy(np.array(load_rgb(path, 2 * PRE.resize_size))).permute(2, 0, 1))
        with pytest.raises(UnreadableImage):
            store.image(broken)
    assert first.decoded == second.decoded == len(paths) // 2  # the fill above found nothing left to decode


def test_a_share_survives_its_writer_ending_first(tmp_path: Path) -> None:
    """Ranks end at their own pace: one that deletes its file must not take the images from another still reading."""
    paths = photos(tmp_path / "images")
    first, second = halves(paths, tmp_path)
    assert second.adopt(first.shared())  # nothing read yet
    first.release()
    assert not first.spill_path.exists()
    for path in paths[::2]:  # the first process's share, read only now
        assert torch.equal(pixels(second, path), torch.from_numpy(np.array(load_rgb(path, 2 * PRE.resize_size))).permute(2, 0, 1))
    second.release()
    assert not second.spill_path.exists()


@pytest.mark.parametrize("where", ["missing", "shorter"])
def test_a_share_this_process_cannot_see_is_decoded_here_instead(tmp_path: Path, where: str) -> None:
    """A rank whose host name matches but whose disk is another machine's: it decodes the images itself."""
    paths = photos(tmp_path / "images")
    first, second = halves(paths, tmp_path)
    share = first.shared()
    if where == "missing":
        share.file.unlink()
    else:
        os.truncate(share.file, share.size - 1)
    assert not second.adopt(share)
    assert share.file not in second._readers  # the handle opened to look at it is closed again
    assert second.fill(paths, 0)
    assert second.decoded == len(paths)
    for path in paths:
        assert torch.equal(pixels(second, path), torch.from_numpy(np.array(load_rgb(path, 2 * PRE.resize_size))).permute(2, 0, 1))


def test_a_share_of_files_that_all_fail_to_decode_is_read_without_a_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    writer = PixelStore(2 * PRE.resize_size, 2**30, tmp_path / "spill" / "pixels-rank0.u8")
    assert writer.fill([broken], 0, to_disk=True)
    share = writer.shared()
    assert share.size == 0 and not share.file.exists()
    reader = PixelStore(2 * PRE.resize_size, 2**30, tmp_path / "spill" / "pixels-rank1.u8")
    assert reader.adopt(share) and reader.fill([broken], 0) and reader.decoded == 0  # known broken: not decoded again
    with pytest.raises(UnreadableImage):
        reader.image(broken)


def test_a_share_that_cannot_be_written_does_not_ask_for_more_memory(tmp_path: Path) -> None:
    """A share for other processes goes to disk whatever the memory budget: only disk space helps."""
    paths = photos(tmp_path / "images")
    (tmp_path / "spill" / "pixels.u8").mkdir(parents=True)  # what a full or read-only disk looks like to open()
    store = PixelStore(2 * PRE.resize_size, 2**30, tmp_path / "spill" / "pixels.u8")
    with pytest.raises(ThawError, match="free disk space there$"):
        store.fill(paths, 0, to_disk=True)


class _Numbers(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int) -> int:
        return index


@pytest.mark.skipif(not hasattr(signal, "sigwaitinfo"), reason="Linux only: elsewhere torch's worker handler ends a worker on any SIGTERM")
def test_a_decoding_worker_outlives_another_process_s_sigterm_and_ends_on_its_parent_s() -> None:
    """`timeout` and SLURM send SIGTERM to every process of a job: the training process stops the run (a checkpoint);
    its workers must outlive that signal, sent as they start (before their init function runs) or later, yet still
    end when the training process itself terminates them (as DataLoader's shutdown does with a stuck one)."""
    import subprocess
    import sys
    import time

    def from_another_process(pid: int) -> None:
        subprocess.run([sys.executable, "-c", f"import os, signal; os.kill({pid}, signal.SIGTERM)"], check=True)

    for _launch in range(3):
        loader = pixel_store.WorkerLoader(_Numbers(), batch_size=4, num_workers=1, persistent_workers=True,
                                          worker_init_fn=pixel_store.ignore_interrupts)
        iterator = iter(loader)  # the worker is forked here
        worker = loader._iterator._workers[0]
        try:
            from_another_process(worker.pid)  # as it starts
            assert [next(iterator).tolist()[0] for _ in range(6)] == [0, 4, 8, 12, 16, 20]  # past what it fetched ahead
            from_another_process(worker.pid)  # and once it works
            time.sleep(0.5)
            assert worker.is_alive() and [next(iterator).tolist()[0] for _ in range(6)] == [24, 28, 32, 36, 40, 44]
            os.kill(worker.pid, signal.SIGTERM)  # from its parent, as DataLoader's shutdown and multiprocessing do
            worker.join(timeout=30)
            assert worker.exitcode == 0
        finally:
            loaders.stop_workers(loader)
