"""--ema: a moving average of the weights, measured on val and delivered, in stages that train pretrained layers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import Crash, cli_config, crash_after, ctrl_c_in_the_next_epoch
from thaw import ThawError, build_model
from thaw.cli import main
from thaw.export.inference import evaluate_run
from thaw.export.run_dir import load_run
from thaw.plan import ConstantLr, Plan, Stage
from thaw.train import TrainConfig, train_images
from thaw.train.checkpoint import load_checkpoint
from thaw.train.ema import MAX_DECAY, WARMUP_POWER
from thaw.train.fit import RunInterrupted

CONFIG = TrainConfig(image_size=32, batch_size=8, quiet=True, ema=True)
HEAD_THEN_TOP = Plan((Stage("head", 1, ("head",), ConstantLr(3e-3)), Stage("top", 2, ("-2:",), ConstantLr(1e-3), batchnorm="eval")))


def train(data: Path, out: Path, plan: Plan = HEAD_THEN_TOP, **options: object):
    return train_images(data, model="mobilenet_v3_small", weights=None, plan=plan, config=CONFIG, out=out, **options)


class StepRecorder:
    """A step hook that copies the raw and the averaged weights after every optimizer step."""

    def attach(self, trainer) -> None:
        self.trainer, self.raw, self.average = trainer, [], []

    def __call__(self, _optimizer: torch.optim.Optimizer, _step: int, _factor: float) -> None:
        self.raw.append({n: p.detach().clone() for n, p in self.trainer.model.named_parameters()})
        self.average.append({n: p.detach().clone() for n, p in self.trainer.ema.module.named_parameters()})


def test_the_average_follows_the_documented_decay_and_is_what_val_measures_and_the_run_delivers(tiny_split_data: Path, tmp_path: Path) -> None:
    recorder = StepRecorder()
    plan = Plan((Stage("all", 1, ("all",), ConstantLr(1e-3), batchnorm="eval"),))
    result = train(tiny_split_data, tmp_path / "run", plan=plan, step_hooks=[recorder])
    assert len(recorder.raw) == 5  # 36 images, batch 8
    expected = recorder.raw[0]  # decay 0 at the first step: the average starts at the weights after it
    assert all(torch.equal(recorder.average[0][n], expected[n]) for n in expected)
    for step in range(1, len(recorder.raw)):
        decay = min(1 - (1 + step) ** -WARMUP_POWER, MAX_DECAY)
        expected = {n: decay * expected[n] + (1 - decay) * recorder.raw[step][n] for n in expected}
        for name, tensor in recorder.average[step].items():
            torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-6)
    last_raw, last_average = recorder.raw[-1], recorder.average[-1]
    assert any(not torch.equal(last_raw[n], last_average[n]) for n in last_raw)  # the average is not the weights
    delivered = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert all(torch.equal(delivered[n], last_average[n]) for n in last_average)  # the only epoch: its average is delivered
    adapter, meta = load_run(tmp_path / "run")
    scored = evaluate_run(adapter, meta, tiny_split_data, split="val")
    assert scored["loss"] == pytest.approx(result.best["val"]["loss"], rel=1e-4)  # val was measured on the average


def test_frozen_layers_stay_bit_identical_and_a_head_stage_keeps_no_average(tiny_split_data: Path, tmp_path: Path) -> None:
    with pytest.raises(Crash):
        train(tiny_split_data, tmp_path / "cut", callbacks=[crash_after(1)])
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["ema"] is None  # the head trained on cached features, no average
    train(tiny_split_data, tmp_path / "run")
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    raw, average = saved["model"], saved["ema"]
    assert average is not None and raw.keys() == average.keys()
    adapter = build_model("mobilenet_v3_small", weights=None, num_classes=3)
    trained = [f"{member}." for group in adapter.groups[-2:] for member in group.modules]  # "-2:": the top group and the head
    frozen = [name for name in raw if not name.startswith(tuple(trained))]
    assert frozen and all(torch.equal(raw[name], average[name]) for name in frozen)  # weights and BatchNorm statistics
    assert any(not torch.equal(raw[name], average[name]) for name in raw if name not in frozen)


@pytest.mark.parametrize("stop", ["crash after the top stage's first epoch", "Ctrl-C inside the top stage's first epoch"])
def test_a_resumed_run_ends_with_the_average_of_an_uninterrupted_one(tiny_split_data: Path, tmp_path: Path, stop: str) -> None:
    train(tiny_split_data, tmp_path / "whole")

    crash = stop.startswith("crash")
    options, raised = ({"callbacks": [crash_after(2)]}, Crash) if crash else (ctrl_c_in_the_next_epoch(1), RunInterrupted)
    with pytest.raises(raised):
        train(tiny_split_data, tmp_path / "cut", **options)
    assert crash or load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["batch"] == 1  # inside the top stage's first epoch
    train(tiny_split_data, tmp_path / "cut", resume=True)
    whole, cut = (load_checkpoint(tmp_path / name / "checkpoint.pt") for name in ("whole", "cut"))
    assert all(torch.equal(whole["ema"][k], cut["ema"][k]) for k in whole["ema"])
    delivered = [load_file(str(tmp_path / name / "model.safetensors")) for name in ("whole", "cut")]
    assert all(torch.equal(delivered[0][k], delivered[1][k]) for k in delivered[0])


def test_the_default_recipe_averages_and_smooths_and_flags_turn_both_off(tiny_split_data: Path, tmp_path: Path) -> None:
    """The recipe benchmark chose --ema --label-smoothing 0.1 (README, Which recipe), for `thaw train` and TrainConfig()."""
    args = [str(tiny_split_data), "--model", "mobilenet_v3_small", "--weights", "none", "--image-size", "32", "--batch-size", "8",
            "--strategy", "fine-tune", "--epochs", "1", "--quiet"]
    assert TrainConfig().ema is True and TrainConfig().label_smoothing == 0.1
    assert main(["train", *args, "--out", str(tmp_path / "default")]) == 0
    recorded = json.loads((tmp_path / "default" / "thaw.json").read_text())["train_config"]
    assert recorded["ema"] is True and recorded["label_smoothing"] == 0.1
    assert load_checkpoint(tmp_path / "default" / "checkpoint.pt")["ema"] is not None
    assert main(["train", *args, "--no-ema", "--label-smoothing", "0", "--out", str(tmp_path / "off")]) == 0
    assert json.loads((tmp_path / "off" / "thaw.json").read_text())["train_config"]["label_smoothing"] == 0.0
    saved = load_checkpoint(tmp_path / "off" / "checkpoint.pt")
    delivered = load_file(str(tmp_path / "off" / "model.safetensors"))
    assert saved["ema"] is None and all(torch.equal(delivered[k], saved["model"][k]) for k in delivered)  # the weights themselves
    with pytest.raises(ThawError, match="ema must be true or false, got 'yes'"):
        TrainConfig(ema="yes")


def test_every_training_key_of_a_plan_file_is_a_training_option() -> None:
    from dataclasses import fields

    from thaw.plan.config import TRAINING_KEYS

    assert set(TRAINING_KEYS) <= {field.name for field in fields(TrainConfig)}


def test_a_plan_file_carries_recipe_options_and_typed_flags_win(tmp_path: Path) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text("stages: [{name: all, epochs: 1, train: [all], lr: 1.0e-4}]\ntraining: {label_smoothing: 0.2, ema: true}\n")

    def config(*typed: str) -> TrainConfig:
        return cli_config("data", "--model", "mobilenet_v2", "--config", str(plan), *typed)

    assert (config().label_smoothing, config().ema) == (0.2, True)
    assert config("--label-smoothing", "0.1").label_smoothing == 0.1  # typed on the command line: the flag wins
    assert config("--no-ema").ema is False
    plan.write_text("stages: [{name: all, epochs: 1, train: [all], lr: 1.0e-4}]\ntraining: {labl_smoothing: 0.2}\n")
    with pytest.raises(ThawError, match=r"training: unknown key 'labl_smoothing' \(did you mean 'label_smoothing'\?\)"):
        config()
    plan.write_text("stages: [{name: all, epochs: 1, train: [all], lr: 1.0e-4}]\ntraining: {ema: maybe}\n")
    with pytest.raises(ThawError, match="ema must be true or false, got 'maybe'"):
        config()


def test_a_run_recorded_before_the_weight_average_existed_resumes_without_one(tiny_split_data: Path, tmp_path: Path) -> None:
    """Its settings have no `ema` (nor `budget`): the newer default would change the run halfway. `resume_run` continues
    it without an average; a resume with today's defaults is refused in one line instead of silently switching."""
    from thaw.train import resume_run
    from thaw.train.checkpoint import save_checkpoint

    plan = Plan((Stage("all", 2, ("all",), ConstantLr(1e-3), batchnorm="eval"),))
    old = TrainConfig(image_size=32, batch_size=8, quiet=True, ema=False, label_smoothing=0.0)
    with pytest.raises(Crash):
        train_images(tiny_split_data, model="mobilenet_v3_small", weights=None, plan=plan, config=old, out=tmp_path / "old",
                     callbacks=[crash_after(1)])
    saved = load_checkpoint(tmp_path / "old" / "checkpoint.pt")
    for key in ("ema", "budget"):  # as a thaw before them wrote it
        del saved["settings"]["config"][key]
    del saved["ema"]
    save_checkpoint(tmp_path / "old" / "checkpoint.pt", saved)
    with pytest.raises(ThawError, match=r"ema \(the run: False, now: True\)"):
        train_images(tiny_split_data, model="mobilenet_v3_small", weights=None, plan=plan, out=tmp_path / "old", resume=True,
                     config=TrainConfig(image_size=32, batch_size=8, quiet=True, label_smoothing=0.0))
    resume_run(tmp_path / "old", quiet=True)
    ended = load_checkpoint(tmp_path / "old" / "checkpoint.pt")
    assert ended["ema"] is None and len(ended["history"]) == 2


def test_the_documented_decay_schedule() -> None:
    # The README states these numbers; the tests above take them from the code, so pin them here once.
    assert (WARMUP_POWER, MAX_DECAY) == (0.75, 0.9998)
