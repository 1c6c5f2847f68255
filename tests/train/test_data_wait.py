"""Each epoch says how much of its training time went to waiting for batches: whether the data path keeps up."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import pytest

from thaw.cli import main
from thaw.data.loaders import ImageDataset

SLOW_S = 0.05  # per image, far above what a 32 px crop and a tiny model's step take
TINY = ["--model", "mobilenet_v3_small", "--weights", "none", "--image-size", "32", "--batch-size", "8", "--no-augment"]


def test_a_slow_loader_shows_in_the_epoch_line_and_metrics_and_cached_epochs_wait_for_nothing(
    tiny_split_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    read = ImageDataset.__getitem__

    def slow_read(self: ImageDataset, key: object) -> object:
        time.sleep(SLOW_S)
        return read(self, key)

    monkeypatch.setattr(ImageDataset, "__getitem__", slow_read)
    out = tmp_path / "run"
    argv = ["train", str(tiny_split_data), *TINY, "--strategy", "two-phase", "--head-epochs", "1", "--epochs", "1", "--workers", "0"]
    assert main([*argv, "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    with open(out / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    head, full = rows
    assert head["cached"] == "True" and full["cached"] == "False"
    # 36 train images at 50 ms each: 1.8 s of the full epoch's training went to waiting, against milliseconds of compute
    assert float(full["data_wait_share"]) > 0.5
    assert float(full["data_wait_share"]) <= 1.0
    assert float(head["data_wait_share"]) < 0.5  # features in memory: the head's epoch reads no image
    full_line = next(line for line in lines if line.startswith("all 1:"))
    assert f"waiting for data {float(full['data_wait_share']):.0%})" in full_line
    head_line = next(line for line in lines if line.startswith("head 1:"))
    assert "waiting for data" not in head_line  # nothing to wait for on cached features
