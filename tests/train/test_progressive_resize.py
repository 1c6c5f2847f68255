"""Progressive resizing: smaller crops in a full stage's early epochs, the full size at its last and for every
evaluation; a resumed run ends where a whole one does; sizes the network cannot take are refused up front."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from tests.cli.test_cli import thaw
from tests.conftest import Crash, SmallConvNet, crash_after, cli_config, ctrl_c_in_the_next_epoch
from thaw import ThawError, adapt
from thaw.data.folders import discover
from thaw.plan import ConstantLr, Plan, RangeLr, Stage
from thaw.train import TrainConfig
from thaw.train.checkpoint import load_checkpoint
from thaw.train.fit import RunInterrupted, fit
from thaw.train.resizing import progressive_size

PLAN = Plan((Stage("head", 1, ("head",), ConstantLr(3e-3)), Stage("all", 3, ("all",), RangeLr(1e-4, 1e-3), batchnorm="eval")))
CONFIG = TrainConfig(image_size=64, batch_size=8, quiet=True, progressive_resize=0.5)


@pytest.mark.parametrize("final", [8, 30, 32, 64, 224, 384])
@pytest.mark.parametrize("start", [0.3, 0.5, 0.75])
@pytest.mark.parametrize("epochs", [1, 2, 3, 7])
def test_sizes_grow_to_the_full_size_at_the_last_epoch(final: int, start: float, epochs: int) -> None:
    sizes = [progressive_size(final, start, epoch, epochs) for epoch in range(epochs)]
    assert sizes[-1] == final and sizes == sorted(sizes) and all(0 < size <= final for size in sizes)
    step = 16 if final % 16 == 0 else 1
    if epochs > 1:
        assert abs(sizes[0] - start * final) <= max(step / 2, 1)  # the first epoch at the share asked for
        assert all(size % step == 0 for size in sizes)
        if start * final <= final - step:
            assert sizes[0] < final


def test_the_size_check_covers_every_epoch_count_a_budget_can_choose() -> None:
    from thaw.train.budget import MAX_EPOCHS
    from thaw.train.config import MAX_PROGRESSIVE_EPOCHS

    assert MAX_PROGRESSIVE_EPOCHS >= MAX_EPOCHS


def test_the_documented_example_and_halves_round_up() -> None:
    assert [progressive_size(224, 0.6, epoch, 3) for epoch in range(3)] == [128, 176, 224]  # README, recipes.py
    assert progressive_size(80, 0.5, 0, 2) == 48  # 40 px is 2.5 steps of 16: up to 3, not to the even 2


def _adapter():
    torch.manual_seed(0)
    return adapt(SmallConvNet(), num_classes=3)


def _train(data: Path, out: Path, config: TrainConfig = CONFIG, adapter=None, **options):
    adapter = adapter or _adapter()
    return fit(adapter, discover(data), PLAN, config, out, meta={"model": "small"}, **options)


# workers 2: the crops are cut in persistent worker processes, which must follow each epoch's size
@pytest.mark.parametrize("workers", [0, 2])
def test_the_full_stage_trains_on_growing_crops_and_evaluates_at_the_full_size(tiny_split_data: Path, tmp_path: Path, workers: int) -> None:
    adapter = _adapter()
    seen: list[tuple[bool, int]] = []

    def record(module, args) -> None:
        if not args[0].is_meta:  # the up-front check that the network takes the smallest crops computes no numbers
            seen.append((module.training, args[0].shape[-1]))

    adapter.model.register_forward_pre_hook(record)
    result = _train(tiny_split_data, tmp_path / "run", TrainConfig(**{**CONFIG.__dict__, "workers": workers}), adapter=adapter)
    batches = math.ceil(36 / CONFIG.batch_size)
    assert [size for training, size in seen if training] == [32] * batches + [48] * batches + [64] * batches
    assert {size for training, size in seen if not training} == {64}  # every val pass, the cache's too, at the full size
    assert [row["stage"] for row in result.history] == ["head", "all", "all", "all"]


def test_off_by_default_in_the_library_and_the_cli() -> None:
    assert TrainConfig().progressive_resize is None and cli_config("data", "--model", "mobilenet_v2").progressive_resize is None


def test_a_plan_where_nothing_resizes_says_so(tiny_split_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = TrainConfig(**{**CONFIG.__dict__, "quiet": False})
    head_only = Plan((Stage("head", 3, ("head",), ConstantLr(3e-3)),))  # trained on cached full-size features
    fit(_adapter(), discover(tiny_split_data), head_only, config, tmp_path / "run", meta={"model": "small"})
    assert "--progressive-resize changes nothing here" in capsys.readouterr().out


# after_epoch 2: the interrupt lands in the full stage's second epoch (48 px), which the resumed run finishes.
@pytest.mark.parametrize("workers", [0, 2])
def test_ctrl_c_in_a_smaller_epoch_resumes_to_the_same_weights(tiny_split_data: Path, tmp_path: Path, workers: int) -> None:
    config = TrainConfig(**{**CONFIG.__dict__, "batch_size": 4, "workers": workers})
    _train(tiny_split_data, tmp_path / "whole", config)

    with pytest.raises(RunInterrupted, match="--resume"):
        _train(tiny_split_data, tmp_path / "cut", config, **ctrl_c_in_the_next_epoch(2))
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["batch"] == 1
    _train(tiny_split_data, tmp_path / "cut", config, resume=True)
    whole, cut = (load_checkpoint(tmp_path / name / "checkpoint.pt")["model"] for name in ("whole", "cut"))
    assert whole.keys() == cut.keys() and all(torch.equal(whole[k], cut[k]) for k in whole)


def test_resume_refuses_another_progressive_share(tiny_split_data: Path, tmp_path: Path) -> None:
    with pytest.raises(Crash):
        _train(tiny_split_data, tmp_path / "run", callbacks=[crash_after(2)])
    other = TrainConfig(**{**CONFIG.__dict__, "progressive_resize": 0.75})
    with pytest.raises(ThawError, match=r"progressive-resize \(the run: 0.5, now: 0.75\)"):
        _train(tiny_split_data, tmp_path / "run", other, resume=True)


@pytest.mark.parametrize(
    "options, expected",
    [
        ({"progressive_resize": 1.0}, "above 0 and below 1"),
        ({"progressive_resize": 0.0}, "above 0 and below 1"),
        ({"progressive_resize": float("nan")}, "above 0 and below 1"),
        ({"progressive_resize": 0.5, "augment": False}, "--no-augment"),
    ],
)
def test_impossible_shares_are_refused_when_the_config_is_made(options: dict, expected: str) -> None:
    with pytest.raises(ThawError, match=expected):
        TrainConfig(**options)


@pytest.mark.parametrize(
    "extra, expected",
    [
        # torchvision's ViT has position embeddings for one grid of patches: the first of 2 epochs at 112 px is refused
        # before any data is read
        (["--model", "vit_b_16", "--head-epochs", "1", "--epochs", "2", "--progressive-resize", "0.5"],
         "cannot take the 112 px crops progressive resize 0.5 trains with"),
        (["--model", "mobilenet_v3_small", "--head-epochs", "1", "--image-size", "32", "--progressive-resize", "0.5", "--no-augment"], "--no-augment"),
        (["--model", "mobilenet_v3_small", "--head-epochs", "1", "--progressive-resize", "2"], "expected a share"),
        # a head stage without the cache runs the network on images too; a budget may give a 1-epoch stage more epochs
        (["--model", "vit_b_16", "--strategy", "feature-extract", "--head-epochs", "2", "--no-cache", "--progressive-resize", "0.5"],
         "cannot take the 112 px crops"),
        (["--model", "vit_b_16", "--head-epochs", "1", "--epochs", "1", "--budget", "60", "--progressive-resize", "0.5"],
         "cannot take the 112 px crops"),
    ],
)
def test_bad_progressive_resize_is_one_line(tiny_split_data: Path, tmp_path: Path, extra: list[str], expected: str) -> None:
    result = thaw("train", str(tiny_split_data), "--weights", "none", "--out", str(tmp_path / "run"), *extra)
    assert result.returncode == 2
    assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "run").exists()  # refused before its first checkpoint: no run folder is left


def test_a_plan_file_sets_progressive_resize_and_a_typed_flag_wins(tmp_path: Path) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text("stages: [{name: all, epochs: 3, train: [all], lr: 1.0e-4}]\ntraining: {progressive_resize: 0.6}\n")

    def config(*typed: str) -> TrainConfig:
        return cli_config("data", "--model", "mobilenet_v2", "--config", str(plan), *typed)

    assert config().progressive_resize == 0.6
    assert config("--progressive-resize", "0.8").progressive_resize == 0.8
    plan.write_text("stages: [{name: all, epochs: 3, train: [all], lr: 1.0e-4}]\ntraining: {progressive_resize: 3}\n")
    with pytest.raises(ThawError, match="progressive resize must be a share of the image size above 0 and below 1, got 3"):
        config()


def test_a_text_run_refuses_progressive_resize_in_one_line(tmp_path: Path, tiny_encoder: Path) -> None:
    from tests.conftest import write_text_table

    table = write_text_table(tmp_path / "t.tsv", rows_per_class=10)
    result = thaw("train", str(table), "--task", "text", "--model", str(tiny_encoder), "--epochs", "2",
                   "--progressive-resize", "0.5", "--out", str(tmp_path / "run"))
    assert result.returncode != 0
    assert "progressive resize resizes images; leave it unset for text" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
