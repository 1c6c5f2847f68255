"""Stages that train only the top groups run the frozen bottom once, on cached views, and train as if it ran every epoch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torchvision.models import VisionTransformer, mobilenet_v3_small
from torchvision.ops import StochasticDepth

from tests.conftest import Crash, cli_config, crash_after, ctrl_c_in_the_next_epoch
from thaw import adapt, apply_trainable, build_model, resolve
from thaw.plan import ConstantLr, Plan, RangeLr, Stage, enter_stage
from thaw.models.lora import LoraSpec
from thaw.plan.stages import resolve_stage
from thaw.train import TrainConfig, train_images
from thaw.train.checkpoint import load_checkpoint
from thaw.data.folders import discover
from thaw.train.feature_cache import fingerprint
from thaw.train.fit import RunInterrupted, Trainer, choose_engine, fit
from thaw.train.progress import CACHED, FULL, PREFIX
from thaw.train.prefix_cache import Entry, check_skipped, disagreement, find_entry, tail_forward

HEAD_THEN_TOP = Plan((Stage("head", 1, ("head",), ConstantLr(3e-3)), Stage("top2", 2, ("-2:",), RangeLr(1e-4, 1e-3), batchnorm="eval")))
BASE = dict(image_size=32, batch_size=8, quiet=True, augment=False)


def _train(data: Path, out: Path, model: str = "mobilenet_v3_small", plan: Plan = HEAD_THEN_TOP, **config):
    return train_images(data, model=model, weights=None, plan=plan, config=TrainConfig(**(BASE | config)), out=out)


def _fit_module(model: nn.Module, data: Path, plan: Plan, out: Path):
    return fit(adapt(model, num_classes=3), discover(data), plan, TrainConfig(**BASE), out, meta={"model": type(model).__name__})


def _weights(out: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The last epoch's weights and the delivered ones (the weight average of the best epoch)."""
    last = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
    return last, load_file(str(out / "model.safetensors"))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "model, precision",
    # resnet18: its stem's relu and maxpool are skipped too, and the boundary is a block's feature map
    [("mobilenet_v3_small", "fp32"), ("mobilenet_v3_small", "bf16"), ("resnet18", "fp32"), ("resnet18", "bf16")],
)
def test_the_top_trained_on_the_cached_bottom_equals_running_the_network(tiny_split_data: Path, tmp_path: Path, model: str, precision: str) -> None:
    cached = _train(tiny_split_data, tmp_path / "cached", model, precision=precision)
    live = _train(tiny_split_data, tmp_path / "live", model, precision=precision, cache_prefix=False)
    assert [row["cached"] for row in cached.history] == [True, True, True]
    assert [row["cached"] for row in live.history] == [True, False, False]
    assert [r["val_loss"] for r in cached.history] == [r["val_loss"] for r in live.history]
    for a, b in zip(_weights(tmp_path / "cached"), _weights(tmp_path / "live")):
        assert _same(a, b)


# a group slice, as `--lora-targets=-4:` gives it: mobilenet_v3_small's features.11, features.12, classifier.0 and
# the head (which LoRA leaves out: it trains in full)
LORA_ON_THE_TOP = Plan((Stage("lora", 2, ("head", "adapters"), ConstantLr(3e-3)),), LoraSpec(rank=4, alpha=8, targets=("-4:",)))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_lora_on_the_top_groups_trains_on_the_cached_bottom_as_if_the_network_ran(tiny_split_data: Path, tmp_path: Path, precision: str) -> None:
    cached = _train(tiny_split_data, tmp_path / "cached", plan=LORA_ON_THE_TOP, precision=precision)
    live = _train(tiny_split_data, tmp_path / "live", plan=LORA_ON_THE_TOP, precision=precision, cache_prefix=False)
    assert [row["cached"] for row in cached.history] == [True, True]
    assert [row["cached"] for row in live.history] == [False, False]
    assert [r["val_loss"] for r in cached.history] == [r["val_loss"] for r in live.history]
    for a, b in zip(_weights(tmp_path / "cached"), _weights(tmp_path / "live")):
        assert _same(a, b)
    adapters = [name for name in _weights(tmp_path / "cached")[1] if "lora_" in name]
    assert {name.split(".lora_")[0] for name in adapters} == {"features.11.block.0.0", "features.11.block.2.fc1", "features.11.block.2.fc2",
                                                            "features.11.block.3.0", "features.12.0", "classifier.0"}


def test_the_frozen_bottom_stays_bit_identical_and_the_top_trains(tiny_split_data: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = mobilenet_v3_small(num_classes=3)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    plan = Plan((Stage("top2", 2, ("-2:",), ConstantLr(1e-3), batchnorm="eval"),))  # the last Linear before the head, and the head
    result = _fit_module(model, tiny_split_data, plan, tmp_path / "run")
    assert all(row["cached"] for row in result.history)
    trained, _ = _weights(tmp_path / "run")
    bottom = [name for name in before if name.startswith("features.")]  # weights and BatchNorm statistics
    assert bottom and all(torch.equal(before[name], trained[name]) for name in bottom)
    assert all(not torch.equal(before[name], trained[name]) for name in ("classifier.0.weight", "classifier.3.weight"))


@pytest.mark.parametrize("stop", ["crash after the top stage's first epoch", "Ctrl-C inside the top stage's first epoch"])
def test_a_stop_in_a_cached_top_stage_resumes_to_the_uninterrupted_weights(tiny_split_data: Path, tmp_path: Path, stop: str) -> None:
    whole = _train(tiny_split_data, tmp_path / "whole")

    crash = stop.startswith("crash")
    stopping, raised = ({"callbacks": [crash_after(2)]}, Crash) if crash else (ctrl_c_in_the_next_epoch(1), RunInterrupted)
    options = {"model": "mobilenet_v3_small", "weights": None, "plan": HEAD_THEN_TOP, "config": TrainConfig(**BASE), "out": tmp_path / "cut"}
    with pytest.raises(raised):
        train_images(tiny_split_data, **stopping, **options)
    assert crash or load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["batch"] == 1  # inside the top stage's first epoch
    resumed = train_images(tiny_split_data, resume=True, **options)
    assert [r["val_loss"] for r in resumed.history] == [r["val_loss"] for r in whole.history]
    assert all(row["cached"] for row in resumed.history)
    for a, b in zip(_weights(tmp_path / "cut"), _weights(tmp_path / "whole")):
        assert _same(a, b)


def test_in_a_longer_gradual_plan_the_head_stage_serves_the_top_2_and_later_stages_cache_their_own(
    tiny_split_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
) -> None:
    rule = RangeLr(1e-4, 1e-3)
    plan = Plan((*HEAD_THEN_TOP.stages, Stage("top3", 1, ("-3:",), rule, batchnorm="eval"), Stage("top4", 1, ("-4:",), rule, batchnorm="eval")))
    cached = _train(tiny_split_data, tmp_path / "cached", plan=plan, quiet=False)
    said = capsys.readouterr().out
    live = _train(tiny_split_data, tmp_path / "live", plan=plan, cache_prefix=False)
    assert said.count(" ran once (") == 3 and said.count("cached in the stage before") == 1, said
    assert all(row["cached"] for row in cached.history)
    assert [r["val_loss"] for r in cached.history] == [r["val_loss"] for r in live.history]
    for a, b in zip(_weights(tmp_path / "cached"), _weights(tmp_path / "live")):
        assert _same(a, b)


def test_a_crash_in_the_top_2_stage_of_a_longer_plan_resumes_to_the_uninterrupted_weights(tiny_split_data: Path, tmp_path: Path) -> None:
    # Uninterrupted, the top-2 stage trains on what the head stage cached; resumed, it caches the same itself.
    plan = Plan((*HEAD_THEN_TOP.stages, Stage("top3", 1, ("-3:",), RangeLr(1e-4, 1e-3), batchnorm="eval")))
    whole = _train(tiny_split_data, tmp_path / "whole", plan=plan)
    options = {"model": "mobilenet_v3_small", "weights": None, "plan": plan, "config": TrainConfig(**BASE), "out": tmp_path / "crashed"}
    with pytest.raises(Crash):
        train_images(tiny_split_data, callbacks=[crash_after(2)], **options)
    resumed = train_images(tiny_split_data, resume=True, **options)
    assert [r["val_loss"] for r in resumed.history] == [r["val_loss"] for r in whole.history]
    for a, b in zip(_weights(tmp_path / "crashed"), _weights(tmp_path / "whole")):
        assert _same(a, b)


def test_cached_bottom_outputs_spill_past_the_memory_budget_and_go_with_the_stage(tiny_split_data: Path, tmp_path: Path) -> None:
    out, seen = tmp_path / "spilled", []
    spilled = train_images(
        tiny_split_data, model="mobilenet_v3_small", weights=None, plan=HEAD_THEN_TOP, out=out,
        config=TrainConfig(**(BASE | {"cache_memory_gb": 1e-9})),
        callbacks=[lambda state: seen.append(sorted(p.name for p in (out / "feature-cache").glob("*.npy")))],
    )
    assert [len(files) for files in seen] == [2, 2, 2]  # train and val, on disk while the stages run
    assert seen[0] == seen[1] == seen[2]  # the head stage cached the top stage's boundary: one pass serves both
    assert not (out / "feature-cache").exists()
    in_memory = _train(tiny_split_data, tmp_path / "memory")
    assert [r["val_loss"] for r in spilled.history] == [r["val_loss"] for r in in_memory.history]


@pytest.mark.parametrize(
    "options, cached",
    [
        ({"augment": True}, True),  # the evaluation view, as the head stage
        ({"augment": True, "mixup": 0.2}, False),  # blends images
        ({"augment": True, "cutmix": 1.0}, False),
        ({"augment": True, "auto_augment": "trivial"}, False),  # changes the images every epoch
        ({"augment": True, "auto_augment": "trivial", "cache_views": 2}, True),  # ... inside each cached view
        ({"augment": True, "progressive_resize": 0.5}, True),  # the evaluation view at the full size, as the head stage
        ({"budget": 60.0}, True),  # the budget times the top stage over cached inputs too
        ({"cache": False}, False),
    ],
)
def test_options_that_change_the_images_every_epoch_keep_the_top_on_the_images(
    tiny_split_data: Path, tmp_path: Path, options: dict, cached: bool,
) -> None:
    result = _train(tiny_split_data, tmp_path / "run", **options)
    assert {row["cached"] for row in result.history if row["stage"] == "top2"} == {cached}


@pytest.mark.parametrize(
    "options, kinds",
    [
        ({}, [CACHED, PREFIX, FULL]),
        ({"augment": True, "progressive_resize": 0.5}, [CACHED, PREFIX, FULL]),  # only the last stage resizes
        ({"cache_prefix": False}, [CACHED, FULL, FULL]),
        ({"augment": True, "mixup": 0.2}, [CACHED, FULL, FULL]),
    ],
)
def test_the_plan_predicts_the_stages_that_train_on_the_cached_bottom(
    tiny_split_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, options: dict, kinds: list[str],
) -> None:
    # The progress bar's time left, the decision to decode every image once and the progressive-resize note
    # rest on this prediction, made before any stage runs.
    predicted, ran = [], []
    run_stage = Trainer.run_stage

    def spy(trainer: Trainer, stage_index: int, callbacks: list) -> None:
        predicted.append(trainer.engine.progress.kinds[stage_index])
        run_stage(trainer, stage_index, callbacks)
        ran.append(trainer.engine.progress.kinds[stage_index])

    monkeypatch.setattr(Trainer, "run_stage", spy)
    plan = Plan((*HEAD_THEN_TOP.stages, Stage("all", 2, ("all",), ConstantLr(1e-4))))
    adapter = build_model("mobilenet_v3_small", weights=None, num_classes=3)
    trained_on: list[int] = []  # the size of every image batch the network trained on
    adapter.model.register_forward_pre_hook(
        lambda module, args: trained_on.append(args[0].shape[-1]) if module.training and args[0].shape[1] == 3 else None
    )
    # fp32: on random weights the all stage's 16 px crops can drive bf16 depthwise kernels on CPU to NaN (seen once
    # in CI, where thaw stopped with its one-line NaN error); this test is about which stages run on cached inputs.
    config = TrainConfig(**(BASE | {"precision": "fp32"} | options))
    fit(adapter, discover(tiny_split_data), plan, config, tmp_path / "run", meta={"model": "mobilenet_v3_small"})
    assert predicted == ran == kinds
    if "progressive_resize" in options:  # the top stage trained on full-size cached views; only the all stage resized
        half = len(trained_on) // 2
        assert half and trained_on == [16] * half + [32] * half


def test_a_plan_whose_top_stage_trains_on_the_cached_bottom_says_progressive_resize_changes_nothing(
    tiny_split_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
) -> None:
    result = _train(tiny_split_data, tmp_path / "run", augment=True, progressive_resize=0.5, quiet=False)
    assert "--progressive-resize changes nothing here" in capsys.readouterr().out
    assert all(row["cached"] for row in result.history)


@pytest.mark.parametrize("policy", ["frozen", "eval", "train", "adapt"])
def test_whether_batchnorm_statistics_move_in_a_stage_is_predicted_as_entering_it_sets_them(tmp_path: Path, tiny_split_data: Path, policy: str) -> None:
    # Under torchrun this decides, before the stage starts, whether it can train on cached inputs (DDP keeps moving
    # statistics in step). resnet18: its top 2 groups (layer4, fc) hold BatchNorm layers of their own.
    adapter = build_model("resnet18", weights=None, num_classes=3)
    stage = Stage("top2", 1, ("-2:",), ConstantLr(1e-3), batchnorm=policy)
    trainer = Trainer(adapter, discover(tiny_split_data), Plan((stage,)), TrainConfig(**(BASE | {"workers": 0})), tmp_path, meta={"model": "resnet18"})
    predicted = trainer._statistics_move(stage, set(resolve_stage(adapter, stage).trainable))
    enter_stage(adapter, stage)
    assert predicted == trainer.batchnorm_updates() == (policy in ("frozen", "train"))


def test_augmented_views_of_the_bottom_are_cycled_by_epoch(tiny_split_data: Path, tmp_path: Path) -> None:
    plan = Plan((Stage("top2", 2, ("-2:",), ConstantLr(1e-3), batchnorm="eval"),))
    # resnet18: its random weights learn at 32 px (mobilenet_v3_small's reach the same loss, ln 3, on every view)
    one = _train(tiny_split_data, tmp_path / "one", "resnet18", plan=plan, augment=True, cache_views=1)
    two = _train(tiny_split_data, tmp_path / "two", "resnet18", plan=plan, augment=True, cache_views=2)
    assert all(row["cached"] for row in one.history + two.history)
    assert one.history[0]["train_loss"] == two.history[0]["train_loss"]  # the first view is the same
    assert one.history[1]["train_loss"] != two.history[1]["train_loss"]  # the second epoch: view 1 against view 0 again


class RandomInTheTopBlock(nn.Module):
    """Its top block draws at random in train mode: a dropout layer, stochastic depth, or dropout in the forward."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        random_layer = {"dropout layer": nn.Dropout(0.5), "stochastic depth": StochasticDepth(0.5, "row")}.get(kind, nn.Identity())
        self.block2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), random_layer)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top = self.block2(self.block1(self.stem(x))).mean(dim=(2, 3))
        if self.kind == "dropout in the forward":
            top = nn.functional.dropout(top, 0.5, self.training)
        return self.fc(top)


@pytest.mark.parametrize("kind", ["dropout layer", "stochastic depth", "dropout in the forward"])
def test_a_head_stage_keeps_its_own_features_where_the_frozen_block_above_the_boundary_draws_at_random(
    tiny_split_data: Path, tmp_path: Path, kind: str,
) -> None:
    # Sharing the top-2 boundary would run block2's randomness in train mode under the head: not a fixed feature extractor.
    plan = Plan((Stage("head", 1, ("head",), ConstantLr(3e-3)), Stage("top2", 1, ("-2:",), ConstantLr(1e-3), batchnorm="eval")))
    torch.manual_seed(0)
    model = RandomInTheTopBlock(kind)
    cached = fit(adapt(model, num_classes=3), discover(tiny_split_data), plan, TrainConfig(**BASE), tmp_path / "cached", meta={"model": "d"})
    torch.manual_seed(0)
    live = fit(adapt(RandomInTheTopBlock(kind), num_classes=3), discover(tiny_split_data), plan, TrainConfig(**(BASE | {"cache_prefix": False})),
               tmp_path / "live", meta={"model": "d"})
    assert [row["cached"] for row in cached.history] == [True, True] and [row["cached"] for row in live.history] == [True, False]
    assert [r["val_loss"] for r in cached.history] == [r["val_loss"] for r in live.history]
    for a, b in zip(_weights(tmp_path / "cached"), _weights(tmp_path / "live")):
        assert _same(a, b)


def test_entering_leaves_no_hook_and_gives_back_a_forward_the_module_had_even_when_the_tail_fails(small_net) -> None:
    own = small_net.stem.forward  # a forward set on the instance, as wrappers do
    small_net.stem.forward = own
    entry = Entry("block2", ("block1", "stem"), ("block2", "classifier", "pool"))
    with pytest.raises(RuntimeError):
        tail_forward(small_net, entry)(torch.randn(2, 5, 8, 8))  # 5 channels: block2's convolution refuses
    assert small_net.stem.__dict__["forward"] is own and "forward" not in small_net.block1.__dict__
    assert not small_net.block2._forward_pre_hooks


class SkipAcrossTheBoundary(nn.Module):
    """Its forward reuses a tensor from below the top block after it: entering mid-way cannot give its logits."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())  # a boundary smaller than the image
        self.block1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        early = self.block1(self.stem(x))
        top = self.block2(early * 2.0) + early
        return self.fc(top.mean(dim=(2, 3)))


def _entry_of(adapter, selectors: list[str], images: torch.Tensor) -> Entry | str:
    trainable = tuple(apply_trainable(adapter, resolve(adapter, selectors), batchnorm="eval"))
    engine = choose_engine(TrainConfig(precision="fp32", quiet=True), adapter.model)
    found = find_entry(adapter, trainable, images, engine)
    return found if isinstance(found, str) else (disagreement(adapter.model, found, images, engine) or found)


def test_a_forward_that_computes_across_the_boundary_trains_on_the_images(tiny_split_data: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    adapter = adapt(SkipAcrossTheBoundary(), num_classes=3)
    found = _entry_of(adapter, ["-2:"], torch.randn(4, 3, 32, 32))
    assert isinstance(found, str) and "does not give its own logits" in found
    plan = Plan((Stage("top2", 1, ("-2:",), ConstantLr(1e-3), batchnorm="eval"),))
    result = _fit_module(SkipAcrossTheBoundary(), tiny_split_data, plan, tmp_path / "run")
    assert not result.history[0]["cached"]


def test_a_torchvision_vit_trains_its_top_on_the_images_and_says_why() -> None:
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=3, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=3)
    adapter = adapt(model, num_classes=3)
    found = _entry_of(adapter, ["-2:"], torch.randn(4, 3, 32, 32))
    assert isinstance(found, str) and "cannot be entered" in found  # its forward reshapes the patches outside a layer


def test_where_the_bottom_output_is_larger_than_the_image_the_stage_trains_on_the_images(small_net) -> None:
    adapter = adapt(small_net, num_classes=3)  # its first blocks keep the full resolution with 8 and 16 channels
    found = _entry_of(adapter, ["block2", "head"], torch.randn(4, 3, 32, 32))
    assert isinstance(found, str) and "larger than the image" in found


def test_a_batchnorm_that_updates_below_the_boundary_keeps_the_stage_on_the_images() -> None:
    torch.manual_seed(0)
    # Policy train on a BatchNorm without affine parameters: nothing of it trains, yet its statistics move every step.
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8, affine=False), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU()),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )
    adapter = adapt(model, num_classes=3)
    trainable = tuple(apply_trainable(adapter, resolve(adapter, ["-2:"]), batchnorm="train"))
    engine = choose_engine(TrainConfig(precision="fp32", quiet=True), adapter.model)
    found = find_entry(adapter, trainable, torch.randn(4, 3, 32, 32), engine)
    assert isinstance(found, str) and "BatchNorm 0.1 below 1 updates its statistics" in found


def test_the_flag_and_the_plan_file_key(tmp_path: Path) -> None:
    assert cli_config("data", "--model", "mobilenet_v2").cache_prefix is True
    assert cli_config("data", "--model", "mobilenet_v2", "--no-prefix-cache").cache_prefix is False
    plan = tmp_path / "plan.yaml"
    plan.write_text("stages: [{name: all, epochs: 1, train: [all], lr: 1.0e-4}]\ntraining: {cache_prefix: false}\n")
    assert cli_config("data", "--model", "mobilenet_v2", "--config", str(plan)).cache_prefix is False


def test_a_bottom_cache_is_keyed_by_what_runs_below_the_boundary_not_by_what_trains(small_net, tiny_split_data: Path) -> None:
    adapter = adapt(small_net, num_classes=3)
    samples = discover(tiny_split_data).train
    entry = Entry("block2", ("block1", "stem"), ("block2", "classifier", "pool"))
    head_only, with_block2 = tuple(resolve(adapter, ["head"])), tuple(resolve(adapter, ["block2", "head"]))
    key = fingerprint(adapter, head_only, adapter.preprocessing, samples, "views=0", entry)
    assert fingerprint(adapter, with_block2, adapter.preprocessing, samples, "views=0", entry) == key  # the next stage finds it
    with torch.no_grad():
        small_net.block2[0].weight.add_(1.0)  # above the boundary: the cached tensor is the same
    assert fingerprint(adapter, head_only, adapter.preprocessing, samples, "views=0", entry) == key
    with torch.no_grad():
        small_net.block1[0].weight.add_(1e-3)
    assert fingerprint(adapter, head_only, adapter.preprocessing, samples, "views=0", entry) != key


def test_without_randomness_above_the_boundary_the_head_stage_does_share(tiny_split_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    plan = Plan((Stage("head", 1, ("head",), ConstantLr(3e-3)), Stage("top2", 1, ("-2:",), ConstantLr(1e-3), batchnorm="eval")))
    torch.manual_seed(0)
    fit(adapt(RandomInTheTopBlock("none"), num_classes=3), discover(tiny_split_data), plan, TrainConfig(**(BASE | {"quiet": False})),
        tmp_path / "run", meta={"model": "d"})
    assert "stage 'top2': trains on the output of the frozen layers below block2 cached in the stage before" in capsys.readouterr().out


def test_a_trainable_parameter_outside_the_layers_from_the_boundary_on_is_refused(small_net) -> None:
    apply_trainable(adapt(small_net, num_classes=3), [], batchnorm="eval")  # every BatchNorm eval-locked
    entry = Entry("block2", ("block1", "stem"), ("block2", "classifier", "pool"))
    assert check_skipped(small_net, ("block2.0.weight", "classifier.2.weight"), entry) is entry
    found = check_skipped(small_net, ("stem.0.weight", "block2.0.weight"), entry)
    assert found == "stem.0.weight trains but is used before block2"


def test_with_augmentation_the_run_says_the_top_trains_on_the_evaluation_view(tiny_split_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    result = _train(tiny_split_data, tmp_path / "run", augment=True, quiet=False)
    assert [row["cached"] for row in result.history] == [True, True, True]
    said = capsys.readouterr().out
    assert "stage 'top2': the top trains on the evaluation view, not a new random crop each epoch" in said
    assert "stage 'head': the top trains" not in said
