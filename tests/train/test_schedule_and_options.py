"""Schedules, accumulation, clipping and early stopping."""

from __future__ import annotations

from pathlib import Path

import pytest

from thaw.plan import ConstantLr, Plan, Stage
from thaw.train import TrainConfig, train_images
from thaw.train.schedule import multiplier


def test_cosine_warms_up_then_decays_to_zero() -> None:
    values = [multiplier("cosine", step, 20, 0.1) for step in range(20)]
    assert values[0] < values[1] <= 1.0
    assert max(values) == pytest.approx(1.0) and values[-1] < 0.02
    peak = values.index(max(values))
    assert values[peak:] == sorted(values[peak:], reverse=True)


def test_onecycle_starts_low_peaks_in_the_first_quarter_and_ends_near_zero() -> None:
    values = [multiplier("onecycle", step, 40, 0.0) for step in range(40)]
    assert values[0] == pytest.approx(1 / 25)
    assert values.index(max(values)) == 10 and values[-1] < 0.01


def test_constant_schedule() -> None:
    assert {multiplier("constant", step, 10, 0.3) for step in range(10)} == {1.0}


def _plan(epochs: int, lr: float) -> Plan:
    return Plan((Stage("head", epochs, ("head",), ConstantLr(lr)),))


def test_accumulation_and_clipping_train(tiny_split_data: Path, tmp_path: Path) -> None:
    config = TrainConfig(image_size=32, batch_size=4, accumulate=3, grad_clip=0.5, quiet=True)
    result = train_images(tiny_split_data, model="mobilenet_v3_small", weights=None, plan=_plan(2, 1e-2), config=config, out=tmp_path / "r")
    assert len(result.history) == 2 and result.history[-1]["train_loss"] < result.history[0]["train_loss"] * 1.5


def test_early_stopping_ends_a_stage_without_improvement(tiny_split_data: Path, tmp_path: Path) -> None:
    # An lr too small to change anything: the metric cannot improve after the first epoch.
    config = TrainConfig(image_size=32, batch_size=8, early_stopping=2, metric="loss", quiet=True, augment=False)
    result = train_images(tiny_split_data, model="mobilenet_v3_small", weights=None, plan=_plan(10, 1e-12), config=config, out=tmp_path / "r")
    assert len(result.history) < 10
