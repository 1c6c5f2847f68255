"""Schedules, accumulation, clipping and early stopping."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.conftest import Crash, crash_after
from thaw import ThawError, adapt
from thaw.data.folders import discover
from thaw.plan import ConstantLr, Plan, Stage
from thaw.train import TrainConfig, train_images
from thaw.train.checkpoint import load_checkpoint
from thaw.train.fit import fit
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


@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_past_the_last_step_the_schedule_stays_at_its_end(schedule: str) -> None:
    end = multiplier(schedule, 19, 20, 0.1)
    assert [multiplier(schedule, step, 20, 0.1) for step in (20, 25, 40)] == [end] * 3


def _plan(epochs: int, lr: float) -> Plan:
    return Plan((Stage("head", epochs, ("head",), ConstantLr(lr)),))


class _NoDropoutNet(torch.nn.Module):
    """Convolution, BatchNorm and a head, without dropout: one sample's gradient does not depend on its batch."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1))
        self.head = torch.nn.Linear(8, 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(images).flatten(1))


def _gradients_per_step(data: Path, out: Path, batch_size: int, accumulate: int, grad_clip: float | None = None) -> list[list[torch.Tensor]]:
    torch.manual_seed(0)
    adapter = adapt(_NoDropoutNet(), num_classes=3)
    steps: list[list[torch.Tensor]] = []

    def record(optimizer, step: int, factor: float) -> None:  # runs before the gradients are cleared
        steps.append([p.grad.clone() for group in optimizer.param_groups for p in group["params"]])

    plan = Plan((Stage("all", 1, ("all",), ConstantLr(1e-3), batchnorm="eval"),))  # fixed statistics: no batch effects
    config = TrainConfig(image_size=16, batch_size=batch_size, accumulate=accumulate, grad_clip=grad_clip, quiet=True,
                         augment=False, precision="fp32", channels_last=False)
    fit(adapter, discover(data), plan, config, out, meta={"model": "no-dropout"}, step_hooks=[record])
    return steps


@pytest.mark.parametrize("grad_clip", [None, 0.05])
def test_accumulation_steps_like_one_big_batch_including_the_last_partial_group(tiny_split_data: Path, tmp_path: Path, grad_clip) -> None:
    # 36 images: batches of 24 are 24, 12; batches of 8 in threes are (8, 8, 8), (8, 4): the same samples per step.
    # The last group's two batches differ in size, so a mean of their means (4 images weighing as much as 8) fails.
    big = _gradients_per_step(tiny_split_data, tmp_path / "big", 24, 1, grad_clip)
    accumulated = _gradients_per_step(tiny_split_data, tmp_path / "acc", 8, 3, grad_clip)
    assert len(big) == len(accumulated) == math.ceil(36 / 24)
    for step, (a, b) in enumerate(zip(big, accumulated)):
        for x, y in zip(a, b):
            torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-6, msg=f"step {step}")
    if grad_clip:
        assert all(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])) <= grad_clip * (1 + 1e-5) for grads in accumulated)


def test_early_stopping_ends_a_stage_without_improvement(tiny_split_data: Path, tmp_path: Path) -> None:
    # An lr too small to change anything: the metric cannot improve after the first epoch.
    config = TrainConfig(image_size=32, batch_size=8, early_stopping=2, metric="loss", quiet=True, augment=False)
    result = train_images(tiny_split_data, model="mobilenet_v3_small", weights=None, plan=_plan(10, 1e-12), config=config, out=tmp_path / "r")
    # Epoch 1 is the best there is; epochs 2 and 3 bring nothing: --early-stopping 2 ends the stage after epoch 3.
    losses = [row["val_loss"] for row in result.history]
    assert len(result.history) == 3 and min(losses[1:]) >= losses[0], losses


def test_a_crash_right_after_an_early_stop_resumes_into_the_next_stage(tiny_split_data: Path, tmp_path: Path) -> None:
    plan = Plan((Stage("head", 8, ("head",), ConstantLr(1e-12)), Stage("all", 1, ("all",), ConstantLr(1e-4), batchnorm="eval")))
    config = TrainConfig(image_size=32, batch_size=8, early_stopping=1, metric="loss", quiet=True, augment=False)
    options = {"model": "mobilenet_v3_small", "weights": None, "plan": plan, "config": config}
    whole = train_images(tiny_split_data, out=tmp_path / "whole", **options)
    head_epochs = sum(row["stage"] == "head" for row in whole.history)
    assert head_epochs < 8 and whole.history[-1]["stage"] == "all"  # the head stage did end early
    with pytest.raises(Crash):  # dies just after the early stop was written, before the next stage's first checkpoint
        train_images(tiny_split_data, out=tmp_path / "cut", callbacks=[crash_after(head_epochs)], **options)
    resumed = train_images(tiny_split_data, out=tmp_path / "cut", resume=True, **options)
    assert [(r["stage"], r["stage_epoch"]) for r in resumed.history] == [(r["stage"], r["stage_epoch"]) for r in whole.history]
    a, b = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")["model"], load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_last_batch_of_one_is_left_out_where_batchnorm_trains(tiny_split_data: Path, tmp_path: Path) -> None:
    # 36 images in batches of 5 leave one image last; at 32 px mobilenet_v3_small's last BatchNorm sees a 1x1 map,
    # and batch statistics of a single value do not exist.
    plan = Plan((Stage("all", 1, ("all",), ConstantLr(1e-3), batchnorm="train"),))
    steps: list[int] = []
    config = TrainConfig(image_size=32, batch_size=5, quiet=True, augment=False)
    result = train_images(
        tiny_split_data, model="mobilenet_v3_small", weights=None, plan=plan, config=config, out=tmp_path / "r",
        step_hooks=[lambda optimizer, step, factor: steps.append(step)],
    )
    assert steps == list(range(7)) and len(result.history) == 1  # 35 images in 7 steps; the lone last one is left out
    with pytest.raises(ThawError, match="BatchNorm layers use batch statistics .* one image per batch does not have; use batch_size 2 or more \\(--batch-size\\)"):
        train_images(tiny_split_data, model="mobilenet_v3_small", weights=None, plan=plan, out=tmp_path / "one",
                     config=TrainConfig(image_size=32, batch_size=1, quiet=True, augment=False))


def test_label_smoothing_changes_the_training_loss_by_the_formula() -> None:
    """(1 - e) * cross-entropy + e * the mean over classes of -log p: the training loss, and so its gradients."""
    from thaw.data.loaders import Batch
    from thaw.train.loop import Engine, MetricTracker, _forward_backward

    torch.manual_seed(0)
    head = torch.nn.Linear(6, 4)
    batch = Batch(torch.randn(5, 6), torch.tensor([0, 1, 2, 3, 1]), [])
    log_p = head(batch.images).log_softmax(dim=1)
    plain = -log_p[range(5), batch.labels].mean()
    expected = (0.9 * plain - 0.1 * log_p.mean(dim=1).mean()).item()
    losses = {}
    for smoothing in (0.0, 0.1):
        engine = Engine(torch.device("cpu"), bf16=False, channels_last=False, quiet=True, label_smoothing=smoothing)
        head.zero_grad()
        losses[smoothing] = _forward_backward(head, batch, engine, "test", MetricTracker(4))
    assert losses[0.0] == pytest.approx(plain.item(), rel=1e-6)
    assert losses[0.1] == pytest.approx(expected, rel=1e-6) and abs(losses[0.1] - losses[0.0]) > 1e-3


def test_label_smoothing_reaches_the_run_and_a_resume_keeps_it(tiny_split_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib
    import json

    from thaw.cli import main

    fit_module = importlib.import_module("thaw.train.fit")  # the module: thaw.train.fit the attribute is its function
    choose_engine, smoothing_trained_with = fit_module.choose_engine, []

    def recording(config: TrainConfig, model: torch.nn.Module):
        engine = choose_engine(config, model)
        smoothing_trained_with.append(engine.label_smoothing)
        return engine

    monkeypatch.setattr(fit_module, "choose_engine", recording)
    base = [str(tiny_split_data), "--model", "mobilenet_v3_small", "--weights", "none", "--image-size", "32", "--batch-size", "8",
            "--strategy", "feature-extract", "--epochs", "1", "--quiet"]
    assert main(["train", *base, "--label-smoothing", "0.2", "--out", str(tmp_path / "smooth")]) == 0
    assert smoothing_trained_with == [0.2]
    assert json.loads((tmp_path / "smooth" / "thaw.json").read_text())["train_config"]["label_smoothing"] == 0.2
    assert main(["train", "--resume", str(tmp_path / "smooth"), "--label-smoothing", "0.1"]) == 2  # contradicts the run
    with pytest.raises(ThawError, match=r"label smoothing must be a share in \[0, 1\), got 1.0"):
        TrainConfig(label_smoothing=1.0)


def test_label_smoothing_leaves_the_val_loss_plain() -> None:
    """The val loss ranks tied epochs: it stays plain cross-entropy whatever the training loss smooths."""
    from thaw.data.loaders import Batch
    from thaw.train.loop import Engine, evaluate

    torch.manual_seed(0)
    head = torch.nn.Linear(6, 4)
    batches = [Batch(torch.randn(5, 6), torch.tensor([0, 1, 2, 3, 1]), [])]
    plain = torch.nn.functional.cross_entropy(head(batches[0].images), batches[0].labels).item()
    engine = Engine(torch.device("cpu"), bf16=False, channels_last=False, quiet=True, label_smoothing=0.3)
    assert evaluate(head, batches, engine, 4)["loss"] == pytest.approx(plain, rel=1e-6)


@pytest.mark.parametrize(
    ("device", "first_words"),
    [("meta", "the meta device holds shapes, not numbers: it cannot train or run a model; use device 'cpu' or 'cuda' (--device cpu or cuda)"),
     ("cuda:99", "device 'cuda:99' (--device cuda:99): this machine has")],
)
def test_a_device_that_cannot_train_is_named_as_the_api_and_the_flag_spell_it(tiny_split_data: Path, tmp_path: Path, device: str,
                                                                             first_words: str) -> None:
    """A user of the Python API typed device='cuda:99', no flag: the message names the argument and the flag beside it."""
    with pytest.raises(ThawError) as refused:
        train_images(tiny_split_data, model="mobilenet_v3_small", weights=None, plan="feature-extract", out=tmp_path / "run",
                     config=TrainConfig(device=device, quiet=True))
    assert str(refused.value).startswith(first_words) and "\n" not in str(refused.value)
    assert not (tmp_path / "run").exists()  # refused before the data was read and the run folder made


@pytest.mark.parametrize("name", ["channels_last", "augment", "strict", "quiet", "cache", "cache_prefix", "ema", "compile"])
@pytest.mark.parametrize("value", ["no", 0, None])
def test_every_switch_of_train_config_takes_true_or_false_only(name: str, value: object) -> None:
    # "no" is true in Python: augment="no" trained with augmentation on, and recorded "no" as the run's setting.
    with pytest.raises(ThawError, match=f"^{name.replace('_', ' ')} must be true or false, got {value!r}$"):
        TrainConfig(**{name: value})
    assert getattr(TrainConfig(**{name: False}), name) is False


@pytest.mark.parametrize("batch_size", [0, 2**20 + 1, 2**63])
def test_a_batch_size_out_of_range_is_one_line(batch_size: int) -> None:
    """2**63 reached the loader's slicing as a traceback; a million samples a step is past any machine's memory."""
    with pytest.raises(ThawError, match=rf"^batch size must be a whole number from 1 to 1048576, got {batch_size}; try 32"):
        TrainConfig(batch_size=batch_size)
    assert TrainConfig(batch_size=2**20).batch_size == 2**20


@pytest.mark.parametrize("name", ["mixup", "cutmix", "budget", "grad_clip", "warmup", "label_smoothing", "cache_memory_gb"])
def test_a_whole_number_beyond_floats_is_one_line(name: str) -> None:
    """A plan file's `cutmix: 1000...0` (400 digits) is a Python int no float holds: an OverflowError in the check."""
    with pytest.raises(ThawError, match=f"^({name}|{name.replace('_', ' ')}) must be .*got 1000"):
        TrainConfig(**{name: 10**400})
