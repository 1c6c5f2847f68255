"""The progress bar counts the whole plan and estimates its time left per kind of stage."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import pytest

from thaw.data.folders import discover
from thaw.models import build_model
from thaw.train import TrainConfig
from thaw.train.fit import fit
from thaw.plan import build_plan
from thaw.train.progress import CACHED, FULL, PlanProgress, bars_disabled, clock


def test_time_left_uses_each_kinds_own_speed_and_says_when_it_is_estimating() -> None:
    progress = PlanProgress(epochs=[2, 3], kinds=[CACHED, FULL], steps_per_epoch=10)
    assert progress.total_steps == 50
    assert progress.postfix(0, 0, 1.0, 0).endswith("plan left estimating")
    progress.record(CACHED, 0.1)
    progress.record(CACHED, 0.3)  # 0.2 s a cached step
    seconds, untimed = progress.seconds_left(0, 5)
    assert seconds == pytest.approx(15 * 0.2) and untimed == [FULL]
    assert progress.postfix(0, 5, 0.5, 80).endswith(f"plan left >{clock(3.0)}, estimating full network steps")
    progress.record(FULL, 2.0)  # full steps are 10x dearer: the estimate must not use the cached speed for them
    assert progress.seconds_left(0, 5) == (pytest.approx(15 * 0.2 + 30 * 2.0), [])
    assert progress.postfix(1, 10, 0.25, 12) == "step 30/50, loss 0.250, 12 img/s, plan left 0:40"
    progress.unit = "texts"  # a text run's samples are texts
    assert progress.postfix(1, 10, 0.25, 12) == "step 30/50, loss 0.250, 12 texts/s, plan left 0:40"


def test_bars_are_off_when_quiet_or_not_at_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert bars_disabled(False) and bars_disabled(True)
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert not bars_disabled(False) and bars_disabled(True)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_bar_shows_stage_step_of_the_whole_plan_and_time_left(
    tiny_split_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    adapter = build_model("mobilenet_v3_small", weights=None, num_classes=3)
    plan = build_plan("two-phase", num_groups=len(adapter.groups), head_epochs=1, epochs=1)
    config = TrainConfig(batch_size=12, image_size=32)  # 36 train images: 3 steps an epoch, 6 in the plan
    fit(adapter, discover(tiny_split_data), plan, config, tmp_path / "run", meta={"model": "mobilenet_v3_small"})
    shown = terminal.getvalue()
    assert "stage 1/2 head 1/1" in shown and "stage 2/2 all 1/1" in shown
    assert "step 0/6, loss" in shown and "step 5/6, loss" in shown
    assert "plan left estimating" in shown  # nothing timed yet
    assert re.search(r"step 2/6, loss [\d.]+, \d+ img/s, plan left >\d+:\d\d, estimating full network steps", shown)
    assert re.search(r"step 5/6, loss [\d.]+, \d+ img/s, plan left \d+:\d\d(?!,)", shown)  # both kinds timed
