"""CUDA paths: bf16 autocast on the GPU, frozen layers, resume, NCCL under torchrun.

CI has no GPU, so these skip there; run `pytest tests/gpu` on a machine with one.
On such a machine the rest of the suite trains on CUDA too (the device defaults
to auto), so frozen-layer, BatchNorm and resume tests cover the GPU as well.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import Crash, crash_after, write_class_images
from tests.distributed.test_torchrun import WORKER, ranks, torchrun
from thaw.data.folders import discover
from thaw.data.loaders import ImageDataset, make_loader
from thaw.data.transforms import train_transform
from thaw.models.adapter import Preprocessing
from thaw.plan import ConstantLr, Plan, RangeLr, Stage
from thaw.train import TrainConfig, train_images

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; run `pytest tests/gpu` on a machine with one")

PLAN = Plan((Stage("head", 2, ("head",), ConstantLr(3e-3)), Stage("all", 2, ("all",), RangeLr(1e-4, 1e-3), batchnorm="eval")))
CONFIG = TrainConfig(image_size=32, batch_size=8, quiet=True, device="cuda")


def run(data: Path, out: Path, **options):
    return train_images(data, model="mobilenet_v3_small", weights=None, plan=PLAN, config=CONFIG, out=out, **options)


def test_cuda_run_picks_bf16_autocast_and_channels_last(tiny_split_data: Path, tmp_path: Path) -> None:
    result = run(tiny_split_data, tmp_path / "run")
    assert result.engine.device.type == "cuda"
    assert result.engine.bf16 == torch.cuda.is_bf16_supported() and result.engine.channels_last
    assert all(torch.isfinite(torch.tensor(h["val_loss"])) for h in result.history)


def test_cuda_resume_continues_from_the_checkpoint(tiny_split_data: Path, tmp_path: Path) -> None:
    whole = run(tiny_split_data, tmp_path / "whole")
    with pytest.raises(Crash):
        run(tiny_split_data, tmp_path / "cut", callbacks=[crash_after(3)])
    saved = torch.load(tmp_path / "cut" / "checkpoint.pt", map_location="cpu", weights_only=True)
    before = [h["val_loss"] for h in saved["history"]]
    resumed = run(tiny_split_data, tmp_path / "cut", resume=True)
    assert len(before) == 3 and len(resumed.history) == len(whole.history) == 4
    assert [h["val_loss"] for h in resumed.history[:3]] == before  # the checkpoint's epochs, kept as they were
    assert abs(resumed.history[-1]["val_accuracy"] - whole.history[-1]["val_accuracy"]) <= 0.2


def test_nccl_collectives_run_under_torchrun(tmp_path: Path) -> None:
    """Every collective thaw uses (DDP, gradient averaging, metric sums, broadcasts) on NCCL with CUDA tensors.
    One GPU hosts one NCCL rank, so a one-GPU machine runs the several-process path with a world of one."""
    data = write_class_images(tmp_path / "data", per_class=16, size=48)
    gpus = torch.cuda.device_count()
    processes = min(gpus, 2)
    out = tmp_path / "nccl"
    extra = ["--collectives-at-one"] if processes == 1 else []
    done = torchrun(str(WORKER), str(data), str(out), "--device", "cuda", *extra, processes=processes,
                    env={"TORCH_HOME": str(tmp_path / "torch_home")})
    assert done.returncode == 0, done.stderr[-3000:]
    logs = [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]
    assert logs[0]["backend"] == "nccl"
    assert logs[0]["cached"] == [True, True, False, False]  # the head trained on features cached in shards
    body = [s["body"] for s in logs[0]["log"] if s["body"] is not None]
    assert body and len(set(body)) == len(body)  # after the unfreeze the body moves at every step
    if processes == 2:
        assert ranks(out)[0]["log"] == ranks(out)[1]["log"]


def test_augmentation_seeding_leaves_the_gpu_random_stream_alone(tmp_path: Path) -> None:
    """Each image's crop is seeded on the CPU generator only: the GPU's dropout stream is the run's own."""
    dataset = ImageDataset(discover(write_class_images(tmp_path / "data", per_class=4, size=40), val_split=0.2).train,
                           train_transform(Preprocessing(resize_size=40, crop_size=32)))
    torch.cuda.manual_seed(0)
    expected = torch.rand(3, device="cuda")
    torch.cuda.manual_seed(0)
    dataset[(0, 123)]
    assert torch.equal(torch.rand(3, device="cuda"), expected)


def test_batches_for_the_gpu_are_page_locked(tmp_path: Path) -> None:
    dataset = ImageDataset(discover(write_class_images(tmp_path / "data", per_class=4, size=40), val_split=0.2).train,
                           train_transform(Preprocessing(resize_size=40, crop_size=32)))
    batch = next(iter(make_loader(dataset, batch_size=4, shuffle=True, seed=0, workers=0, pin_memory=True)))
    assert batch.images.is_pinned() and batch.labels.is_pinned()


def test_blending_on_the_gpu_draws_as_on_the_cpu() -> None:
    """Mixup and cutmix blend batches on the device; their draws come from the CPU generator, so a seed gives the
    same blend on either (and a resumed run on the GPU blends as the uninterrupted one did)."""
    from thaw.train.mixing import BatchMixer

    images, labels = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 3, 0, 1])
    mixer = BatchMixer(4, mixup=0.2, cutmix=1.0)
    for seed in range(6):
        on_cpu = mixer(images, labels, seed)
        on_gpu = mixer(images.cuda().contiguous(memory_format=torch.channels_last), labels.cuda(), seed)
        assert all(torch.allclose(gpu.cpu(), cpu, atol=1e-6) for gpu, cpu in zip(on_gpu, on_cpu))


def test_cuda_run_with_every_augmentation(tiny_split_data: Path, tmp_path: Path) -> None:
    from dataclasses import replace

    config = replace(CONFIG, auto_augment="trivial", mixup=0.2, cutmix=1.0)
    result = train_images(tiny_split_data, model="mobilenet_v3_small", weights=None, plan=PLAN, config=config, out=tmp_path / "run")
    assert result.engine.device.type == "cuda" and len(result.history) == 4
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in result.history)
