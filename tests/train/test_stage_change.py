"""A stage change moves requires_grad, BatchNorm, optimizer groups and state together."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.conftest import SmallConvNet
from thaw import ThawError, adapt
from thaw.plan import ConstantLr, RangeLr, Stage, audit_optimizer, enter_stage
from thaw.plan.freeze import is_eval_locked


def _step(adapter, optimizer) -> None:
    loss = nn.functional.cross_entropy(adapter.model(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 2, 0]))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def test_continuing_groups_keep_state_new_groups_join_frozen_ones_lose_it() -> None:
    torch.manual_seed(0)
    adapter = adapt(SmallConvNet(), num_classes=3)
    head = adapter.model.classifier[2].weight
    _, optimizer = enter_stage(adapter, Stage("head", 1, ("head",), ConstantLr(1e-3)), None)
    _step(adapter, optimizer)
    head_state = optimizer.state[head]["exp_avg"].clone()

    _, same = enter_stage(adapter, Stage("all", 1, ("all",), RangeLr(1e-5, 1e-3)), optimizer)
    assert same is optimizer
    assert torch.equal(optimizer.state[head]["exp_avg"], head_state)
    assert {g["thaw_group"] for g in optimizer.param_groups} == set(adapter.group_names)
    assert not is_eval_locked(adapter.model.stem[1])
    audit_optimizer(adapter.model, optimizer)
    _step(adapter, optimizer)
    stem = adapter.model.stem[0].weight
    assert stem in optimizer.state

    enter_stage(adapter, Stage("head again", 1, ("head",), ConstantLr(1e-3)), optimizer)
    assert stem not in optimizer.state and not stem.requires_grad
    assert is_eval_locked(adapter.model.stem[1])
    audit_optimizer(adapter.model, optimizer)


def test_a_bad_stage_leaves_the_model_unchanged() -> None:
    adapter = adapt(SmallConvNet(), num_classes=3)
    _, optimizer = enter_stage(adapter, Stage("head", 1, ("head",), ConstantLr(1e-3)), None)
    trainable = [n for n, p in adapter.model.named_parameters() if p.requires_grad]
    with pytest.raises(ThawError, match=r"selector 'nothing\*' matches no parameters; use all, a group"):
        enter_stage(adapter, Stage("bad", 1, ("nothing*",), ConstantLr(1e-3)), optimizer)
    assert [n for n, p in adapter.model.named_parameters() if p.requires_grad] == trainable
    audit_optimizer(adapter.model, optimizer)


def test_a_stage_that_would_train_a_module_added_after_adapt_is_refused_before_the_model_changes() -> None:
    """The audit found it after requires_grad was set: the model was left 100% trainable by a stage that failed."""
    adapter = adapt(SmallConvNet(), num_classes=3)
    _, optimizer = enter_stage(adapter, Stage("head", 1, ("head",), ConstantLr(1e-3)), None)
    adapter.model.add_module("extra", nn.Linear(3, 3))
    trainable = [n for n, p in adapter.model.named_parameters() if p.requires_grad]
    with pytest.raises(ThawError, match=r"stage 'all' trains 12 parameters that no layer group holds, so no optimizer group would: "
                                        r"extra.weight, extra.bias; a module added to the model after thaw.adapt"):
        enter_stage(adapter, Stage("all", 1, ("all",), RangeLr(1e-5, 1e-3)), optimizer)
    assert [n for n, p in adapter.model.named_parameters() if p.requires_grad] == trainable


def test_an_optimizer_of_another_model_is_one_line_per_group_not_per_tensor() -> None:
    adapter, other = adapt(SmallConvNet(), num_classes=3), adapt(SmallConvNet(), num_classes=3)
    _, optimizer = enter_stage(other, Stage("all", 1, ("all",), RangeLr(1e-5, 1e-3)), None)
    with pytest.raises(ThawError) as refused:
        audit_optimizer(adapter.model, optimizer)
    said = str(refused.value)
    groups = {group["thaw_group"] for group in optimizer.param_groups}
    assert said.count("of the model (an optimizer made for another model?)") == len(groups)
    assert "group head holds 2 tensors that are not parameters of the model" in said
