"""Adapters for hand-written modules and for timm models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import SmallConvNet
from thaw import ThawError, adapt
from thaw.models import Preprocessing, _structure


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


class HeadRegisteredFirst(nn.Module):
    """The classifier is registered before a projection that the forward calls before it."""

    def __init__(self) -> None:
        super().__init__()
        self.classify = nn.Linear(16, 10)
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.project = nn.Linear(16, 16)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classify(self.project(self.body(images)))


class BlocksRegisteredBackwards(nn.Module):
    """Blocks registered last to first; the forward runs them first to last. Built for 32 px grey images."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16 * 8 * 8, 10)
        self.block3 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2))
        self.block2 = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
        self.block1 = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.block3(self.block2(self.block1(images))), 1))


def test_the_head_is_the_layer_the_forward_ends_with_not_the_last_registered() -> None:
    # By registration order `project` would become a 3-class layer in the middle of the network, and the real
    # classifier a frozen "first group": feature extraction would train the wrong layer, or not run at all.
    model = HeadRegisteredFirst()
    adapter = adapt(model, num_classes=3)
    assert adapter.head_name == "classify" and adapter.group_names == ["body", "project", "head"]
    assert model(torch.randn(2, 3, 24, 24)).shape == (2, 3)


def test_groups_follow_the_forward_pass_not_the_order_of_init() -> None:
    # Groups run stem to head: discriminative lrs give the input layers the smallest lr, and "top 2" the layers
    # next to the head; registration order would turn both upside down. The model takes 32 px grey images only.
    adapter = adapt(BlocksRegisteredBackwards(), num_classes=3)
    assert adapter.group_names == ["block1", "block2", "block3", "head"]


def test_a_model_the_probe_cannot_run_keeps_the_registration_order() -> None:
    class TakesTokens(nn.Module):  # a forward on images fails: the structural rules by registration apply
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(50, 8)
            self.mix = nn.Linear(8, 8)
            self.out = nn.Linear(8, 4)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.out(self.mix(self.embed(tokens)).mean(1))

    assert _structure.forward_order(TakesTokens()) is None
    adapter = adapt(TakesTokens(), num_classes=2)
    assert adapter.head_name == "out" and adapter.group_names == ["embed", "mix", "head"]


def test_the_probe_leaves_the_model_as_it_was() -> None:
    """It runs on a meta-device copy: a forward that keeps state, the modes the user set, no hook left behind."""

    class KeepsAMask(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.fc = nn.Linear(8, 4)
            self.mask: torch.Tensor | None = None

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            features = self.body(images)
            if self.mask is None:  # set on the first call: a meta tensor here would break every later forward
                self.mask = torch.ones_like(features)
            return self.fc(features * self.mask)

    model = KeepsAMask().eval()
    model.body[1].train()  # a mode the user chose for one layer
    statistics = model.body[1].running_mean.clone()
    adapt(model, num_classes=3)
    assert model.mask is None and not model.training and model.body[1].training
    assert torch.equal(model.body[1].running_mean, statistics)
    assert not any(module._forward_pre_hooks for module in model.modules())
    assert model(torch.randn(2, 3, 24, 24)).shape == (2, 3)


def test_the_probe_runs_the_forward_as_training_does() -> None:
    class ClassifiesWhileTraining(nn.Module):  # returns an embedding in eval mode, logits while it trains
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.classifier = nn.Linear(8, 4)
            self.embed = nn.Linear(8, 8)

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            features = self.body(images)
            return self.classifier(features) if self.training else self.embed(features)

    assert adapt(ClassifiesWhileTraining().eval(), num_classes=3).head_name == "classifier"


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
    with pytest.raises(ThawError, match=r"^group 'late': expected a list of module names like \['layer1'\], got 'block2'$"):
        adapt(small_net, groups={"early": ["stem", "block1"], "late": "block2"})  # not b, l, o, c, k, 2


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


@pytest.mark.parametrize("name", ["head", "all", "adapters"])
def test_a_group_cannot_take_a_selectors_name(small_net: SmallConvNet, name: str) -> None:
    # "head" made two groups called head, the first one empty, and a feature-extract plan then failed to resolve.
    with pytest.raises(ThawError, match=f"group name '{name}' is taken"):
        adapt(small_net, groups={"stem": ["stem"], name: ["block1"]}, num_classes=3)


class _ScaledNet(nn.Module):
    """A parameter held by the model itself, outside any module: only its name can place it in a group."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x * self.scale))


def test_explicit_groups_place_a_parameter_held_by_the_model_itself_by_its_name(tmp_path, tiny_split_data) -> None:
    from thaw.plan import Plan, Stage
    from thaw.plan.lr import ConstantLr
    from thaw.train import TrainConfig, train_images

    adapter = adapt(_ScaledNet(), num_classes=3, groups={"scale": ["scale"], "body": ["body"]})
    assert [(g.name, g.params) for g in adapter.groups] == [
        ("scale", ("scale",)), ("body", ("body.0.weight", "body.0.bias")), ("head", ("fc.weight", "fc.bias"))
    ]
    with pytest.raises(ThawError, match=r"^group 'stem': no module or parameter named 'scal'$"):
        adapt(_ScaledNet(), num_classes=3, groups={"stem": ["scal"], "body": ["body"]})
    # a stage that trains that group alone moves the scale and nothing else but the head
    before = {name: tensor.clone() for name, tensor in adapter.model.state_dict().items()}
    plan = Plan((Stage("scale", 1, ("scale", "head"), ConstantLr(1e-2)),))
    train_images(tiny_split_data, model=adapter, out=tmp_path / "run", plan=plan, config=TrainConfig(batch_size=8, image_size=32, quiet=True))
    after = adapter.model.state_dict()
    assert not torch.equal(after["scale"], before["scale"]) and torch.equal(after["body.0.weight"], before["body.0.weight"])


def test_adapt_takes_family_for_a_torchvision_model_and_names_an_unknown_option() -> None:
    import torchvision

    # family= was passed twice on the way to adapt_module: a TypeError for every torchvision model
    adapter = adapt(torchvision.models.resnet18(), family="torchvision", num_classes=2)
    assert adapter.family == "torchvision" and adapter.num_classes == 2
    with pytest.raises(ThawError, match=r"^adapt takes num_classes, head, groups, preprocessing, family; bogus is none of them$"):
        adapt(torchvision.models.resnet18(), bogus=1)


@pytest.mark.parametrize("preprocessing, problem", [
    (Preprocessing(mean="abc"), r"^preprocessing: mean must be 1 or 3 finite numbers"),  # was a ValueError in a transform
    (Preprocessing(std=(0, 0, 0)), r"^preprocessing: std must be 1 or 3 finite numbers above 0"),  # was a NaN loss
    (Preprocessing(crop_size=0, interpolation="cubic"), r"crop_size must be a whole number of pixels above 0, got 0; interpolation must be one of"),
    ({"mean": 1}, r"^preprocessing must be a thaw\.Preprocessing"),  # was read as a text run's
])
def test_a_preprocessing_given_by_hand_is_checked_before_a_run_folder_is_made(
    tmp_path, tiny_split_data, small_net: SmallConvNet, preprocessing: object, problem: str,
) -> None:
    from thaw.train import TrainConfig, train_images
    from thaw.models.adapter import ModelAdapter

    with pytest.raises(ThawError, match=problem):
        adapt(small_net, num_classes=2, preprocessing=preprocessing)
    built = adapt(small_net, num_classes=2)
    built.preprocessing = preprocessing  # a ModelAdapter's, set by hand, is held to the same
    assert isinstance(built, ModelAdapter)
    with pytest.raises(ThawError, match=problem):
        train_images(tiny_split_data, model=built, out=tmp_path / "run", config=TrainConfig(quiet=True), plan="feature-extract")
    assert not (tmp_path / "run").exists()  # an empty run folder was left behind
    adapt(small_net, num_classes=2, preprocessing=Preprocessing(mean=(np.float32(0.5),), std=(np.float32(0.25),)))  # numpy numbers, one channel


def test_a_preprocessing_given_for_a_timm_model_is_the_adapters() -> None:
    import timm

    mine = Preprocessing(resize_size=72, crop_size=64, source="mine")
    assert adapt(timm.create_model("resnet18", pretrained=False, num_classes=3), preprocessing=mine).preprocessing == mine  # was dropped
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3)
    assert adapt(vit, family="timm").preprocessing.mean == (0.5, 0.5, 0.5)  # timm's own config, as without family
    with pytest.raises(ThawError, match=r"^a timm model is adapted by timm's own contract \(family 'timm'\), not 'generic'"):
        adapt(vit, family="generic")  # would have normalised a ViT with ImageNet's mean, without a word
