"""Adapters for hand-written modules and for timm models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.conftest import SmallConvNet
from thaw import ThawError, adapt


def test_generic_model_gets_last_linear_as_head_and_structural_groups(small_net: SmallConvNet) -> None:
    adapter = adapt(small_net, num_classes=3)
    assert adapter.head_name == "classifier.2"
    assert adapter.group_names == ["stem", "block1", "block2", "head"]
    # Flatten and Dropout stay in front of the new head: the head block keeps them.
    assert isinstance(small_net.classifier[1], nn.Dropout)
    small_net.eval()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(adapter.forward_head(adapter.forward_features(images)), small_net(images))
    assert adapter.forward_features(images).shape == (2, 16, 1, 1)


def test_head_named_by_the_user(small_net: SmallConvNet) -> None:
    adapter = adapt(small_net, head="classifier.2", num_classes=9)
    assert small_net(torch.randn(1, 3, 8, 8)).shape == (1, 9)
    assert adapter.num_classes == 9


def test_model_without_linear_says_how_to_name_the_head() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
    with pytest.raises(ThawError, match=r"head='classifier.1'"):
        adapt(model)


def test_head_name_that_is_not_a_module_lists_candidates(small_net: SmallConvNet) -> None:
    with pytest.raises(ThawError, match="classifier.2"):
        adapt(small_net, head="fc")


def test_explicit_groups_must_cover_every_parameter(small_net: SmallConvNet) -> None:
    adapter = adapt(small_net, groups={"early": ["stem", "block1"], "late": ["block2"]})
    assert adapter.group_names == ["early", "late", "head"]
    with pytest.raises(ThawError, match="in no layer group"):
        adapt(small_net, groups={"early": ["stem"]})


def test_timm_model_uses_timm_contract() -> None:
    import timm
    model = timm.create_model("resnet18", pretrained=False)
    adapter = adapt(model, num_classes=4)
    assert adapter.family == "timm"
    assert adapter.head_name == "fc"
    assert adapter.group_names == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    assert adapter.preprocessing.crop_size == model.pretrained_cfg["input_size"][-1]
    model.eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(adapter.forward_head(adapter.forward_features(images)), model(images))


def test_timm_vit_groups_blocks_in_order() -> None:
    import timm
    from thaw.models import build_model

    adapter = build_model("timm/vit_tiny_patch16_224", num_classes=2, device="meta")
    names = adapter.group_names
    assert names[0] == "stem" and names[-1] == "head"
    assert names[1:13] == [f"blocks.{i}" for i in range(12)]
    assert timm is not None
