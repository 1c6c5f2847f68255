"""BatchNorm policy adapt (AdaBN): statistics re-estimated on the training images at a stage's start, then fixed."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tests.conftest import ctrl_c_in_the_next_epoch
from thaw import ThawError, adapt, build_model
from thaw.data.loaders import Batch
from thaw.distributed import Processes
from thaw.plan import ConstantLr, Plan, Stage, apply_trainable
from thaw.plan.freeze import is_eval_locked
from thaw.train import TrainConfig, train_images
from thaw.train.adapt_bn import adapt_batchnorm
from thaw.train.loop import Engine

ENGINE = Engine(torch.device("cpu"), bf16=False, channels_last=False, quiet=True)


def test_the_statistics_become_the_average_over_the_training_batches_and_the_rest_stays() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, momentum=0.3), nn.Dropout(0.5), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(2, 3, 4, 4))  # materialise the lazy layer
    batches = [Batch(torch.randn(5, 3, 4, 4) * 3 + 2, torch.zeros(5, dtype=torch.long), []) for _ in range(3)]
    batches.append(Batch(torch.randn(1, 3, 4, 4), torch.zeros(1, dtype=torch.long), []))  # one image: no statistics, left out
    apply_trainable(adapt(model), ["4.weight", "4.bias"], "adapt")  # what the stage does first: everything else locked
    weights = {name: tensor.clone() for name, tensor in model.state_dict().items() if "running" not in name and "num_batches" not in name}
    model.train()
    seen = adapt_batchnorm(model, batches, ENGINE, Processes(rank=0, world=1, local_rank=0))
    conv, norm = model[0], model[1]
    with torch.no_grad():
        outputs = [conv(batch.images) for batch in batches[:3]]
    expected_mean = torch.stack([out.mean(dim=(0, 2, 3)) for out in outputs]).mean(dim=0)
    expected_var = torch.stack([out.var(dim=(0, 2, 3), unbiased=True) for out in outputs]).mean(dim=0)
    assert seen == 15
    assert torch.allclose(norm.running_mean, expected_mean, atol=1e-5) and torch.allclose(norm.running_var, expected_var, atol=1e-4)
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in weights.items())  # weights untouched
    assert norm.momentum == 0.3 and is_eval_locked(norm) and model.training and not norm.training  # as it was: locked


def test_a_run_with_adapt_changes_the_statistics_once_and_no_weight(tiny_split_data: Path, tmp_path: Path, torch_home: Path) -> None:
    """Feature extraction with adapt: frozen weights bit-identical, the statistics those of one pass over train,
    the head trains on features cached after the pass, and a second run gives bit-identical weights."""
    plan = Plan((Stage("head", 2, ("head",), ConstantLr(3e-3), batchnorm="adapt"),))
    config = TrainConfig(image_size=32, batch_size=8, quiet=True)
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        train_images(tiny_split_data, model="mobilenet_v2", weights="IMAGENET1K_V1", plan=plan, config=config, out=out)
    saved = load_file(str(runs[0] / "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in load_file(str(runs[1] / "model.safetensors")).items())
    pretrained = build_model("mobilenet_v2", weights="IMAGENET1K_V1", num_classes=3).model.state_dict()
    frozen = [name for name in pretrained if not name.startswith("classifier")]
    statistics = [name for name in frozen if "running_" in name]
    assert all(torch.equal(saved[name], pretrained[name]) for name in frozen if name not in statistics and "num_batches" not in name)
    assert all(not torch.equal(saved[name], pretrained[name]) for name in statistics)  # every layer re-estimated
    assert json.loads((runs[0] / "thaw.json").read_text())["plan"]["stages"][0]["batchnorm"] == "adapt"
    with open(runs[0] / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["cached"] for row in rows] == ["True", "True"]  # the head stage still trains on cached features


def test_another_trainer_refuses_adapt_in_one_line() -> None:
    from thaw.integrations.driver import PlanDriver

    adapter = build_model("mobilenet_v3_small", weights=None, num_classes=2)
    plan = Plan((Stage("head", 1, ("head",), ConstantLr(1e-3), batchnorm="adapt"),))
    with pytest.raises(ThawError, match="stage 'head' uses batchnorm: adapt, which re-estimates statistics in thaw's own loop"):
        PlanDriver(adapter, plan)


def test_no_batch_of_two_images_keeps_the_statistics_as_they_were() -> None:
    """Every batch a single image has no batch statistics: the estimate would be the reset values (mean 0, var 1)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    model[1].running_mean.fill_(0.7)
    model[1].running_var.fill_(2.5)
    singles = [Batch(torch.randn(1, 3, 4, 4), torch.zeros(1, dtype=torch.long), []) for _ in range(3)]
    assert adapt_batchnorm(model, singles, ENGINE, Processes(rank=0, world=1, local_rank=0)) == 0
    assert torch.equal(model[1].running_mean, torch.full((4,), 0.7)) and torch.equal(model[1].running_var, torch.full((4,), 2.5))


def test_ctrl_c_inside_an_adapt_stage_resumes_without_estimating_again(tiny_split_data: Path, tmp_path: Path) -> None:
    """Stopped after the first step of the second adapt stage (the network has trained one step since that stage's
    pass): the resumed run keeps the statistics it saved, and ends with the weights of an uninterrupted run."""
    from thaw.plan import RangeLr
    from thaw.train.checkpoint import load_checkpoint
    from thaw.train.fit import RunInterrupted

    plan = Plan((Stage("head", 2, ("head",), ConstantLr(3e-3), batchnorm="adapt"),
                 Stage("all", 2, ("all",), RangeLr(1e-4, 1e-3), batchnorm="adapt")))
    config = TrainConfig(image_size=32, batch_size=4, quiet=True)

    def run(out: Path, **options: object):
        return train_images(tiny_split_data, model="mobilenet_v3_small", weights=None, plan=plan, config=config, out=out, **options)

    run(tmp_path / "whole")

    with pytest.raises(RunInterrupted):
        run(tmp_path / "cut", **ctrl_c_in_the_next_epoch(2))
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["batch"] == 1  # inside the stage's first epoch
    run(tmp_path / "cut", resume=True)
    whole, cut = (load_checkpoint(tmp_path / name / "checkpoint.pt")["model"] for name in ("whole", "cut"))
    assert whole.keys() == cut.keys() and all(torch.equal(whole[k], cut[k]) for k in whole)


def test_apply_stage_in_a_hand_written_loop_refuses_adapt() -> None:
    from thaw import apply_stage

    adapter = build_model("mobilenet_v3_small", weights=None, num_classes=2)
    with pytest.raises(ThawError, match="call thaw.train.adapt_bn.adapt_batchnorm before training"):
        apply_stage(adapter, Stage("head", 1, ("head",), ConstantLr(1e-3), batchnorm="adapt"))
