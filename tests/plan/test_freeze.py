"""Frozen means frozen: weights, BatchNorm statistics, optimizer state, weight decay."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from tests.conftest import SmallConvNet
from thaw import ThawError, adapt, apply_stage, apply_trainable, build_model, resolve
from thaw.plan import Stage, audit_optimizer
from thaw.plan.freeze import batchnorm_layers, is_eval_locked
from thaw.plan.lr import ConstantLr, RangeLr


def _small_models():
    torch.manual_seed(0)
    return {
        "generic": lambda: adapt(SmallConvNet(), num_classes=3),
        "mobilenet_v3_small": lambda: build_model("mobilenet_v3_small", num_classes=3),
        "resnet18": lambda: build_model("resnet18", num_classes=3),
    }


MODELS = _small_models()


def _train_steps(adapter, optimizer, steps: int = 2) -> None:
    torch.manual_seed(1)
    adapter.model.train()  # the call that un-freezes BatchNorm in naive code
    for _ in range(steps):
        images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 3, (4,))
        loss = nn.functional.cross_entropy(adapter.model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _bn_buffers(adapter, frozen_only: bool) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{b}": t.clone()
        for name, layer in batchnorm_layers(adapter.model)
        if not frozen_only or is_eval_locked(layer)
        for b, t in layer.named_buffers()
    }


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    model_name=st.sampled_from(sorted(MODELS)),
    picks=st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=3),
    batchnorm=st.sampled_from(["frozen", "train"]),
    weight_decay=st.sampled_from([0.0, 0.05, 0.5]),
)
def test_frozen_parameters_and_statistics_are_bit_identical_after_training(
    model_name: str, picks: list[int], batchnorm: str, weight_decay: float
) -> None:
    adapter = MODELS[model_name]()
    selectors = sorted({adapter.group_names[i % len(adapter.groups)] for i in picks})
    stage = Stage("s", 1, tuple(selectors), RangeLr(1e-3, 1e-1), weight_decay, batchnorm)
    resolved, optimizer = apply_stage(adapter, stage)
    before = copy.deepcopy(adapter.model.state_dict())
    frozen = [n for n, p in adapter.model.named_parameters() if not p.requires_grad]
    frozen_bn = _bn_buffers(adapter, frozen_only=True)

    _train_steps(adapter, optimizer)

    after = adapter.model.state_dict()
    for name in frozen:
        assert torch.equal(after[name], before[name]), f"frozen {name} moved"
    for name, tensor in frozen_bn.items():
        assert torch.equal(after[name], tensor), f"frozen BatchNorm buffer {name} moved"
    if batchnorm == "train":
        assert not frozen_bn
    params = dict(adapter.model.named_parameters())
    assert not any(params[n] in optimizer.state for n in frozen)
    audit_optimizer(adapter.model, optimizer)
    assert any(not torch.equal(after[n], before[n]) for n in resolved.trainable)


def test_frozen_batchnorm_stays_in_eval_after_model_train(small_net) -> None:
    adapter = adapt(small_net, num_classes=3)
    apply_trainable(adapter, resolve(adapter, ["head"]), batchnorm="frozen")
    small_net.train()
    stats = small_net.stem[1].running_mean.clone(), small_net.stem[1].num_batches_tracked.clone()
    small_net(torch.randn(4, 3, 8, 8) * 5 + 3)
    assert torch.equal(small_net.stem[1].running_mean, stats[0])
    assert torch.equal(small_net.stem[1].num_batches_tracked, stats[1])
    # Nothing else about the layer changed (the Lightning #15062 complaint).
    assert small_net.stem[1].track_running_stats and small_net.stem[1].momentum == 0.1


def test_unfreezing_releases_batchnorm(small_net) -> None:
    adapter = adapt(small_net, num_classes=3)
    apply_trainable(adapter, resolve(adapter, ["head"]))
    apply_trainable(adapter, resolve(adapter, ["all"]))
    small_net.train()
    before = small_net.stem[1].running_mean.clone()
    small_net(torch.randn(4, 3, 8, 8) + 3)
    assert not torch.equal(small_net.stem[1].running_mean, before)


def test_train_policy_trains_batchnorm_affine_in_frozen_groups(small_net) -> None:
    adapter = adapt(small_net, num_classes=3)
    trainable = apply_trainable(adapter, resolve(adapter, ["head"]), batchnorm="train")
    assert "stem.1.weight" in trainable and "stem.0.weight" not in trainable
    small_net.train()
    before = small_net.block1[1].running_var.clone()
    small_net(torch.randn(4, 3, 8, 8) * 3)
    assert not torch.equal(small_net.block1[1].running_var, before)


def test_eval_policy_fixes_statistics_even_where_layers_train(small_net) -> None:
    adapter = adapt(small_net, num_classes=3)
    trainable = apply_trainable(adapter, resolve(adapter, ["all"]), batchnorm="eval")
    assert "stem.1.weight" in trainable and "stem.0.weight" in trainable
    small_net.train()
    before = small_net.block1[1].running_mean.clone()
    small_net(torch.randn(4, 3, 8, 8) + 5)
    assert torch.equal(small_net.block1[1].running_mean, before)
    assert all(is_eval_locked(layer) for _, layer in batchnorm_layers(small_net))


def test_apply_trainable_refuses_names_that_are_not_parameters() -> None:
    # A selector or a typo where a parameter name goes would freeze the whole model and train nothing.
    adapter = adapt(SmallConvNet(), num_classes=3)
    before = {name: param.requires_grad for name, param in adapter.model.named_parameters()}
    for wrong in (["head"], ["fc.weigth"], "fc.weight"[:-1]):
        with pytest.raises(ThawError, match="apply_trainable takes parameter names"):
            apply_trainable(adapter, wrong)
    assert {name: param.requires_grad for name, param in adapter.model.named_parameters()} == before


@pytest.mark.parametrize(
    "options, expected",
    [
        ({"epochs": -1}, "epochs must be a whole number from 0 to 1,000,000, got -1"),
        ({"epochs": 1.5}, "epochs must be a whole number from 0 to 1,000,000, got 1.5"),
        # a typo's count (1e11), and one no float holds, which stopped the run with a traceback once the data was read
        ({"epochs": 10**11}, "epochs must be a whole number from 0 to 1,000,000, got 100000000000"),
        ({"epochs": 10**400}, "epochs must be a whole number from 0 to 1,000,000, got 100000000000... (401 characters)"),
        ({"weight_decay": -0.1}, "weight decay must be a finite number >= 0, got -0.1"),
        ({"weight_decay": float("nan")}, "weight decay must be a finite number >= 0, got nan"),
        ({"batchnorm": "sometimes"}, "batchnorm must be one of frozen, train, eval, adapt"),
        ({"lr": 1e-3}, "lr must be a rule such as ConstantLr(1e-3)"),
        ({"train": "head"}, "train must be a list of selectors like ['head']"),
        ({"name": None}, "name must be a name like 'head', got None"),  # every message names the stage by it
        ({"name": ""}, "name must be a name like 'head', got ''"),
    ],
)
def test_a_stage_built_by_hand_is_checked_like_a_plan_file(options: dict, expected: str) -> None:
    with pytest.raises(ThawError, match=re.escape(expected)):
        Stage(**({"name": "s", "epochs": 1} | options))


@pytest.mark.parametrize("by_name", [{1: 1e-3}, {"": 1e-3}, {None: 1e-3}])
def test_per_group_lrs_are_named_by_group_or_module_names(by_name: dict) -> None:
    from thaw.plan import ExplicitLr

    with pytest.raises(ThawError, match="per-group lrs must be a mapping of group or module names to lrs"):
        ExplicitLr(by_name)


def test_a_stage_takes_any_integer_type_for_its_epochs() -> None:
    import numpy as np

    stage = Stage("s", np.int64(3))
    assert stage.epochs == 3 and type(stage.epochs) is int  # a plan is written to JSON


def test_numpy_numbers_are_taken_wherever_a_number_is_and_kept_as_python_ones() -> None:
    """np.float32(1e-3) as an lr was refused as 'not a positive finite number' (a value read from an array is one)."""
    import json

    import numpy as np

    from thaw import build_plan
    from thaw.plan import DecayLr, ExplicitLr
    from thaw.plan.config import plan_to_dict
    from thaw.train import TrainConfig

    plan = build_plan("head-top-all", num_groups=np.int64(5), lr=np.float32(1e-3), weight_decay=np.float32(0.01), lr_range=(np.float64(1e-5), np.float32(1e-3)))
    assert json.loads(json.dumps(plan_to_dict(plan)))["stages"][0]["lr"] == pytest.approx(1e-3)  # plain floats: JSON takes them
    assert type(plan.stages[0].weight_decay) is float and len(plan.stages) == 3
    rules = [DecayLr(np.float32(1e-3), np.float64(0.75)), ExplicitLr({"head": np.float32(1e-3)}), Stage("s", 1, weight_decay=np.float16(0.5))]
    assert [type(value) for value in (rules[0].head_lr, rules[0].decay, rules[1].by_name["head"], rules[2].weight_decay)] == [float] * 4
    config = TrainConfig(batch_size=np.int64(8), label_smoothing=np.float32(0.1), mixup=np.float64(0.2), augment=np.bool_(True))
    assert [type(value) for value in (config.batch_size, config.label_smoothing, config.mixup, config.augment)] == [int, float, float, bool]
    for refused in (True, "1e-3", np.float32("nan")):  # a bool, text and NaN stay refused
        with pytest.raises(ThawError, match="lr must be a positive finite number"):
            build_plan("two-phase", num_groups=5, lr=refused)


class _NormInNoGroup(nn.Module):
    """An affine-free BatchNorm of the model's own, between two blocks: it has no parameters, so no group holds it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.norm = nn.BatchNorm2d(8, affine=False)
        self.block1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(8, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block2(self.block1(self.norm(self.stem(images)))).mean((2, 3)))


@pytest.mark.parametrize("train, moves", [(["head"], False), (["block1", "head"], False), (["all"], True)])
def test_a_batchnorm_in_no_group_updates_only_where_every_group_trains(train: list[str], moves: bool) -> None:
    """Its statistics moved in a head-only stage: the frozen model changed without a word."""
    torch.manual_seed(0)
    adapter = adapt(_NormInNoGroup(), num_classes=3)
    _, optimizer = apply_stage(adapter, Stage("s", 1, tuple(train), RangeLr(1e-3, 1e-2)))
    before = _bn_buffers(adapter, frozen_only=False)
    _train_steps(adapter, optimizer)
    after = _bn_buffers(adapter, frozen_only=False)
    assert all(torch.equal(after[name], before[name]) for name in before) is not moves


def test_a_stage_decides_requires_grad_whatever_the_model_came_with() -> None:
    """A parameter frozen by hand before adapt trains where a stage's selectors take it, and stays fixed where none does."""
    model = SmallConvNet()
    model.stem[0].weight.requires_grad_(False)
    model.block1[0].weight.requires_grad_(False)
    adapter = adapt(model, num_classes=3, groups={"fixed": ["stem"], "body": ["block1", "block2"]})
    apply_stage(adapter, Stage("top", 1, ("body", "head"), RangeLr(1e-4, 1e-3)))
    assert model.block1[0].weight.requires_grad  # frozen by hand, in a group the stage trains: it trains
    assert not model.stem[0].weight.requires_grad and not model.stem[0].bias.requires_grad  # no selector takes it
    apply_stage(adapter, Stage("all", 1, ("all",), RangeLr(1e-4, 1e-3)))
    assert model.stem[0].weight.requires_grad  # `all` takes every parameter


def test_a_number_no_float_holds_is_one_line_where_a_real_is_taken() -> None:
    from thaw.plan import DecayLr

    with pytest.raises(ThawError, match="layer decay must be in"):
        DecayLr(1e-3, 10**400)
    with pytest.raises(ThawError, match="lr must be a positive finite number"):
        ConstantLr(10**400)


class _InstanceNormNet(nn.Module):
    """A style-transfer-like trunk: InstanceNorm that tracks running statistics, as BatchNorm does."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.InstanceNorm2d(8, affine=True, track_running_stats=True), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.InstanceNorm2d(8), nn.ReLU())  # no statistics kept
        self.fc = nn.Linear(8, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(self.stem(images)).mean((2, 3)))


@pytest.mark.parametrize("train, moves", [(["head"], False), (["all"], True)])
def test_an_instancenorm_that_tracks_statistics_is_frozen_as_batchnorm_is(train: list[str], moves: bool) -> None:
    """Its running statistics moved in a head-only stage of a user's own loop (apply_stage, model.train())."""
    torch.manual_seed(0)
    adapter = adapt(_InstanceNormNet(), num_classes=3)
    _, optimizer = apply_stage(adapter, Stage("s", 1, tuple(train), RangeLr(1e-3, 1e-2), batchnorm="frozen"))
    norm = adapter.model.stem[1]
    before = norm.running_mean.clone(), norm.running_var.clone()
    _train_steps(adapter, optimizer)
    unchanged = torch.equal(norm.running_mean, before[0]) and torch.equal(norm.running_var, before[1])
    assert unchanged is not moves
    assert [name for name, _ in batchnorm_layers(adapter.model)] == ["stem.1"]  # the one without statistics is left as it is


class _TiedNet(nn.Module):
    """An embedding tied to the output layer, as language models do."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(16, 16, bias=False)
        self.embed = nn.Linear(16, 16, bias=False)
        self.embed.weight = self.head.weight
        self.body = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.embed(inputs)))


def test_a_weight_tied_across_groups_is_refused_naming_both() -> None:
    """A head-only stage trained the tied embedding, which no group held: a layer reported frozen changed."""
    with pytest.raises(ThawError, match=r"^embed\.weight is the same tensor as head\.weight \(tied weights\): it would train and "
                       r"freeze with group 'head', while its module lies in no group"):
        adapt(_TiedNet(), head="head")
    model = _TiedNet()
    model.body[2].weight = model.body[0].weight  # tied inside one model, across two groups
    with pytest.raises(ThawError, match=r"body\.2\.weight is the same tensor as body\.0\.weight .* group 'body\.0', while its module lies in group 'body\.2'"):
        adapt(model, num_classes=3, head="head")
    untied = adapt(_TiedNet(), num_classes=3, head="head")  # a new head unties them: the embedding is a group of its own
    assert untied.group_names == ["embed", "body.0", "body.2", "head"]


def test_adabn_and_one_image_batches_leave_an_instancenorm_as_it_is() -> None:
    """AdaBN's estimate (momentum None: a cumulative average) reset an InstanceNorm's statistics to 0 and 1 for good
    (InstanceNorm takes None as 0); and one image a batch, which an InstanceNorm normalises by itself, was refused."""
    from thaw.plan import build_plan
    from thaw.plan.freeze import estimating_statistics
    from thaw.train.config import check_batch_statistics

    torch.manual_seed(0)
    adapter = adapt(_InstanceNormNet(), num_classes=3)
    norm = adapter.model.stem[1]
    adapter.model.train()
    with torch.no_grad():
        adapter.model(torch.randn(4, 3, 16, 16) * 3 + 2)  # statistics of its own, away from 0 and 1
        before = norm.running_mean.clone()
        with estimating_statistics(adapter.model):
            adapter.model(torch.randn(4, 3, 16, 16))
    assert torch.equal(norm.running_mean, before)
    check_batch_statistics(adapter, build_plan("fine-tune", num_groups=len(adapter.groups), batchnorm="train"), 1)  # no refusal
