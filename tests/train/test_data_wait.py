"""Each epoch says how much of its training time went to waiting for batches: whether the data path keeps up."""

from __future__ import annotations

import csv
import os
import signal
import time
from pathlib import Path

import pytest

from thaw.cli import main
from thaw.data.loaders import ImageDataset
from thaw.plan import ConstantLr, Plan, Stage
from thaw.train import TrainConfig, train_images
from thaw.train.fit import RunInterrupted

TINY = ["--model", "mobilenet_v3_small", "--weights", "none", "--image-size", "32", "--batch-size", "8", "--no-augment"]


def _slow_reads(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    read = ImageDataset.__getitem__

    def slow_read(self: ImageDataset, key: object) -> object:
        time.sleep(seconds)
        return read(self, key)

    monkeypatch.setattr(ImageDataset, "__getitem__", slow_read)


def test_a_slow_loader_shows_in_the_epoch_line_and_metrics_and_cached_epochs_have_none(
    tiny_split_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _slow_reads(monkeypatch, 0.05)
    out = tmp_path / "run"
    argv = ["train", str(tiny_split_data), *TINY, "--strategy", "two-phase", "--head-epochs", "1", "--epochs", "1", "--workers", "0"]
    assert main([*argv, "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    with open(out / "metrics.csv", newline="") as handle:
        head, full = list(csv.DictReader(handle))
    assert head["cached"] == "True" and full["cached"] == "False"
    train_seconds = 36 / float(full["images_per_s"])  # 36 train images (tests/conftest.py)
    assert 36 * 0.05 <= float(full["data_wait_share"]) * train_seconds <= train_seconds
    assert head["data_wait_share"] == ""  # features in memory: the head's epoch loads nothing
    full_line = next(line for line in lines if line.startswith("all 1:"))
    assert f"waiting for data {float(full['data_wait_share']):.0%})" in full_line
    head_line = next(line for line in lines if line.startswith("head 1:"))
    assert "waiting for data" not in head_line


def test_the_share_counts_the_wait_for_batches_and_not_the_step(tiny_split_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading slowed by 30 ms an image and every optimizer step by 500 ms: the wait holds the first, not the second."""
    per_image, per_step = 0.03, 0.5
    _slow_reads(monkeypatch, per_image)
    plan = Plan((Stage("all", 1, ("all",), ConstantLr(1e-3), batchnorm="eval"),))
    config = TrainConfig(image_size=32, batch_size=8, quiet=True, augment=False, workers=0)
    result = train_images(
        tiny_split_data, model="mobilenet_v3_small", weights=None, plan=plan, config=config, out=tmp_path / "run",
        step_hooks=[lambda optimizer, step, factor: time.sleep(per_step)],
    )
    (row,) = result.history
    images, steps = 36, 5  # 12 train images per class (tests/conftest.py): 4 batches of 8 and one of 4
    train_seconds = images / row["images_per_s"]
    waited = row["data_wait_share"] * train_seconds
    assert train_seconds > images * per_image + steps * per_step  # both slowdowns are in the epoch
    # at least the reads' sleep; never the steps' (counting them would add 2.5 s, past what the epoch leaves)
    assert images * per_image <= waited <= train_seconds - steps * per_step


def test_a_resumed_epoch_reports_the_rate_of_the_images_it_trained(tiny_split_data: Path, tmp_path: Path) -> None:
    """Ctrl-C after the fourth of five steps: the resumed part trains one batch of 4 images (every step slowed by
    300 ms), so its rate is at most 4 images in 0.3 s."""
    per_step, out = 0.3, tmp_path / "run"
    plan = Plan((Stage("all", 1, ("all",), ConstantLr(1e-3), batchnorm="eval"),))
    config = TrainConfig(image_size=32, batch_size=8, quiet=True, augment=False, workers=0)

    def slow_step(optimizer: object, step: int, factor: float) -> None:
        time.sleep(per_step)

    def press_ctrl_c_after_step_4(optimizer: object, step: int, factor: float) -> None:
        if step == 3:  # handled after this step: 4 of the 5 batches done
            os.kill(os.getpid(), signal.SIGINT)

    run = lambda hooks, resume=False: train_images(  # noqa: E731
        tiny_split_data, model="mobilenet_v3_small", weights=None, plan=plan, config=config, out=out, step_hooks=hooks, resume=resume,
    )
    with pytest.raises(RunInterrupted, match="after batch 4"):
        run([press_ctrl_c_after_step_4])
    resumed = run([slow_step], resume=True)
    (row,) = resumed.history
    assert 0 < row["images_per_s"] <= 4 / per_step  # the whole epoch's 36 images in the resumed part's time: 120/s
    assert 0 < resumed.images_per_s <= 4 / per_step  # the run's rate (thaw.json, the report) counts the same images
