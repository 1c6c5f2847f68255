"""Optimizer groups and learning rates, including the seed recipe's three strategies."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from thaw import ThawError, apply_stage, apply_trainable, build_model, build_optimizer, build_plan, count_parameters, plan_report, trainable_line
from thaw.plan import ConstantLr, DecayLr, ExplicitLr, Plan, RangeLr, Stage, audit_optimizer, load_plan, resolve, resolve_plan, resolve_stage
from thaw.plan.stages import check_named_lrs_are_trained
from thaw.plan.strategies import DEFAULT_HEAD_LR


@pytest.fixture(scope="module")
def resnet50():
    return build_model("resnet50", num_classes=5, device="meta")


def test_seed_strategy_1_feature_extraction_counts(resnet50) -> None:
    resolved = resolve_stage(resnet50, Stage("head", 3, ("head",), ConstantLr(1e-3)))
    _, total = count_parameters(resnet50.model)
    assert trainable_line(resolved.trainable_params, total) == "Trainable: 10,245 / 23,518,277 (0.0%)"


def test_seed_strategy_2_leaving_groups_out_is_refused_with_counts(resnet50) -> None:
    stage = Stage("all", 1, ("all",), ExplicitLr({"layer1": 1e-5, "layer4": 1e-4, "fc": 1e-3}))
    with pytest.raises(ThawError) as error:
        resolve_stage(resnet50, stage)
    message = str(error.value)
    assert "leave 8,327,488 of 23,518,277 trainable parameters" in message
    assert "stem (conv1, bn1): 9,536" in message
    assert "layer2: 1,219,584" in message and "layer3: 7,098,368" in message
    # a plan file's user and a command line's are each told the words they write
    assert message.endswith(
        "give each an lr (lrs in a plan file, --lr NAME=LR on the command line), use lr_range or "
        "layer_decay (--lr-range, --layer-decay), or freeze them"
    )


def test_seed_strategy_2_with_every_group_named_is_accepted(resnet50) -> None:
    lrs = {"conv1": 1e-6, "layer1": 1e-5, "layer2": 2e-5, "layer3": 5e-5, "layer4": 1e-4, "fc": 1e-3}
    resolved = resolve_stage(resnet50, Stage("all", 1, ("all",), ExplicitLr(lrs)))
    assert resolved.group_lrs == {"stem": 1e-6, "layer1": 1e-5, "layer2": 2e-5, "layer3": 5e-5, "layer4": 1e-4, "head": 1e-3}


def test_seed_strategy_3_head_then_everything(resnet50) -> None:
    plan = build_plan("two-phase", num_groups=len(resnet50.groups), head_epochs=3, epochs=2)
    head, everything = (resolve_stage(resnet50, s) for s in plan.stages)
    assert head.trainable_params == 10_245 and everything.trainable_params == 23_518_277
    assert head.group_lrs == {"head": 1e-3}
    assert everything.group_lrs["head"] == pytest.approx(5e-4)
    assert everything.group_lrs["stem"] == pytest.approx(5e-6)


def test_geometric_range_and_layer_decay() -> None:
    names = ["a", "b", "c", "d", "e"]
    ranged = RangeLr(1e-5, 1e-3).lrs(names)
    assert ranged["a"] == pytest.approx(1e-5) and ranged["e"] == pytest.approx(1e-3)
    ratios = [ranged[y] / ranged[x] for x, y in zip(names, names[1:])]
    assert all(r == pytest.approx(ratios[0]) for r in ratios)
    assert RangeLr(1e-5, 1e-3).lrs(["head"]) == {"head": 1e-3}  # one group is the head: the head end, not the stem's
    decayed = DecayLr(1e-3, 0.5).lrs(names)
    assert [decayed[n] for n in names] == pytest.approx([1e-3 * 0.5**k for k in (4, 3, 2, 1, 0)])


@pytest.mark.parametrize("bad", [0.0, -1e-3, math.nan, math.inf])
def test_bad_lrs_are_refused(resnet50, bad: float) -> None:
    with pytest.raises(ThawError, match="positive finite"):
        resolve_stage(resnet50, Stage("head", 1, ("head",), ConstantLr(bad)))


def test_optimizer_groups_follow_the_plan_and_skip_decay_on_norms_and_biases() -> None:
    torch.manual_seed(0)
    adapter = build_model("resnet18", num_classes=4)
    resolved, optimizer = apply_stage(adapter, Stage("all", 1, ("all",), DecayLr(1e-3, 0.5), weight_decay=0.05))
    names = {id(p): n for n, p in adapter.model.named_parameters()}
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(resolved.group_lrs[group["thaw_group"]])
        for param in group["params"]:
            name = names[id(param)]
            decays = param.ndim > 1 and ".bn" not in name and not name.startswith("bn1")
            assert group["weight_decay"] == (0.05 if decays else 0.0), name
    assert {g["thaw_group"] for g in optimizer.param_groups} == set(adapter.group_names)


def test_vit_class_and_position_tokens_do_not_decay_but_attention_weights_do() -> None:
    from torchvision.models import VisionTransformer

    from thaw import adapt

    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=3)
    adapter = adapt(model, num_classes=3)
    _, optimizer = apply_stage(adapter, Stage("all", 1, ("all",), ConstantLr(1e-3), weight_decay=0.05))
    decay = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    named = dict(model.named_parameters())
    assert decay[id(named["class_token"])] == decay[id(named["encoder.pos_embedding"])] == 0.0
    assert decay[id(named["encoder.layers.encoder_layer_0.self_attention.in_proj_weight"])] == 0.05  # torch.nn's own layer
    assert decay[id(named["conv_proj.weight"])] == decay[id(named["heads.head.weight"])] == 0.05


def test_a_weight_matrix_held_outside_torch_nn_layers_still_decays() -> None:
    from torch import nn

    from thaw import adapt

    class Conv1D(nn.Module):  # Hugging Face GPT-2's linear layer: a weight held directly, not an nn.Linear
        def __init__(self, inputs: int, outputs: int) -> None:
            super().__init__()
            self.weight, self.bias = nn.Parameter(torch.randn(inputs, outputs)), nn.Parameter(torch.zeros(outputs))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.weight + self.bias

    model = nn.Sequential(Conv1D(8, 8), nn.ReLU(), nn.Linear(8, 3))
    _, optimizer = apply_stage(adapt(model, num_classes=3), Stage("all", 1, ("all",), ConstantLr(1e-3), weight_decay=0.05))
    decay = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    assert decay[id(model[0].weight)] == 0.05 and decay[id(model[0].bias)] == 0.0


def test_a_stage_whose_lr_times_weight_decay_reaches_one_is_refused_where_anything_decays() -> None:
    """`--weight-decay 1e30` trained to weights 1e27 times too large; norms and biases, which never decay, are no cause."""
    from torch import nn

    from thaw import adapt
    from thaw.plan.optim import check_decay_below_lr

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    adapter = adapt(model, num_classes=3)
    huge = Plan((Stage("all", 1, ("all",), ConstantLr(1e-3), weight_decay=1e30),))
    with pytest.raises(ThawError, match=r"^stage 'all': lr x weight decay is 1e\+27 in group '.*' \(lr 0.001, weight decay 1e\+30\): each step"):
        check_decay_below_lr(adapter, resolve_plan(adapter, huge))
    norm = next(name for name, module in model.named_modules() if isinstance(module, nn.BatchNorm2d))
    norms_only = Plan((Stage("norms", 1, (norm,), ExplicitLr({"stem": 10.0, "head": 1e-3}), weight_decay=0.1, batchnorm="train"),))
    check_decay_below_lr(adapter, resolve_plan(adapter, norms_only))  # the stem trains its norm alone: 10 x 0.1 decays nothing
    convolution_too = Plan((Stage("stem", 1, ("stem",), ExplicitLr({"stem": 10.0, "head": 1e-3}), weight_decay=0.1, batchnorm="train"),))
    with pytest.raises(ThawError, match=r"^stage 'stem': lr x weight decay is 1 in group 'stem' \(lr 10, weight decay 0.1\)"):
        check_decay_below_lr(adapter, resolve_plan(adapter, convolution_too))
    usual = Plan((Stage("all", 1, ("all",), ConstantLr(1e-3), weight_decay=0.05), Stage("none", 0, ("all",), ConstantLr(1e3), weight_decay=1.0)))
    check_decay_below_lr(adapter, resolve_plan(adapter, usual))  # a stage of 0 epochs trains nothing


def test_audit_catches_left_out_and_frozen_parameters() -> None:
    adapter = build_model("resnet18", num_classes=4)
    for param in adapter.model.parameters():
        param.requires_grad_(True)
    left_out = torch.optim.AdamW([{"params": adapter.model.fc.parameters()}])
    with pytest.raises(ThawError, match="in no optimizer group and would never train"):
        audit_optimizer(adapter.model, left_out)
    adapter.model.layer1.requires_grad_(False)
    with_frozen = torch.optim.AdamW(adapter.model.parameters())
    with pytest.raises(ThawError, match="frozen parameter layer1"):
        audit_optimizer(adapter.model, with_frozen)
    with pytest.raises(ThawError, match="frozen parameter layer1"):
        audit_optimizer(adapter, with_frozen)  # the adapter's model, audited the same


def test_gradual_unfreezes_one_group_per_stage_from_the_top(resnet50) -> None:
    plan = build_plan("gradual", num_groups=len(resnet50.groups), head_epochs=1, epochs=1)
    counts = [resolve_stage(resnet50, s).trainable_params for s in plan.stages]
    assert len(plan.stages) == len(resnet50.groups)
    assert counts == sorted(counts) and counts[0] == 10_245 and counts[-1] == 23_518_277
    second = resolve_stage(resnet50, plan.stages[1])
    assert {g.name for g in second.groups if g.trainable} == {"layer4", "head"}


def test_head_top_all_trains_the_head_then_the_top_two_groups_then_everything(resnet50) -> None:
    plan = build_plan("head-top-all", num_groups=len(resnet50.groups), head_epochs=2, epochs=3)
    assert [(s.name, s.epochs, s.batchnorm) for s in plan.stages] == [("head", 2, "frozen"), ("top2", 3, "eval"), ("all", 3, "eval")]
    top = resolve_stage(resnet50, plan.stages[1])
    assert {g.name for g in top.groups if g.trainable} == {"layer4", "head"}
    assert resolve_stage(resnet50, plan.stages[2]).trainable_params == 23_518_277
    # the top two stages follow two-phase's unfrozen lr rule: the head's lr halved, the stem 100x below it
    assert plan.stages[1].lr == plan.stages[2].lr == build_plan("two-phase", num_groups=len(resnet50.groups)).stages[1].lr


def test_top_groups_sets_how_many_groups_the_middle_stage_trains(resnet50) -> None:
    plan = build_plan("head-top-all", num_groups=len(resnet50.groups), top_groups=3)
    assert [(s.name, s.train) for s in plan.stages] == [("head", ("head",)), ("top3", ("-3:",)), ("all", ("all",))]
    assert {g.name for g in resolve_stage(resnet50, plan.stages[1]).groups if g.trainable} == {"layer3", "layer4", "head"}
    # as many top groups as the model has, or more: the middle stage would repeat the last, and dropping it would
    # give two-phase's plan where the user asked for a top stage, so it is refused
    assert [s.name for s in build_plan("head-top-all", num_groups=6, top_groups=5).stages] == ["head", "top5", "all"]
    for top in (6, 7):
        with pytest.raises(ThawError) as refused:
            build_plan("head-top-all", num_groups=6, top_groups=top)
        assert str(refused.value) == (
            f"top groups {top}: the model has 6 groups, the head included, so that stage would train all of them, "
            "as the all stage after it does; give fewer than 6, or use two-phase"
        )
    # left to its default, a model of two groups or fewer gets two-phase, as documented
    assert [s.name for s in build_plan("head-top-all", num_groups=2).stages] == ["head", "all"]


@pytest.mark.parametrize("bad", [0, 1, True, 2.5, "3"])
def test_top_groups_below_two_or_not_a_count_is_refused(bad) -> None:
    with pytest.raises(ThawError, match="top groups must be a whole number of at least 2"):
        build_plan("head-top-all", num_groups=6, top_groups=bad)


def test_top_groups_accepts_a_numpy_count_and_is_refused_beside_another_strategy() -> None:
    import numpy as np

    assert [s.name for s in build_plan("head-top-all", num_groups=6, top_groups=np.int64(3)).stages] == ["head", "top3", "all"]
    gradual = build_plan("gradual", num_groups=5, groups_per_stage=np.int64(2)).stages  # the same rule for its step
    assert [s.name for s in gradual] == ["head", "top3", "all"]
    for strategy in ("two-phase", "gradual", "fine-tune", "feature-extract", "lora"):  # they would ignore it without a word
        with pytest.raises(ThawError, match=f"the strategy here is {strategy}"):
            build_plan(strategy, num_groups=6, top_groups=3)
    with pytest.raises(ThawError, match="unknown strategy 'two_phase'"):  # the name is what is wrong
        build_plan("two_phase", num_groups=6, top_groups=3)
    from thaw.models.lora import LoraSpec

    with pytest.raises(ThawError, match="^lora sets the LoRA adapters; the strategy here is two-phase: drop it or use lora$"):
        build_plan("two-phase", num_groups=6, lora=LoraSpec(rank=4))
    assert build_plan("lora", num_groups=6, lora=LoraSpec(rank=4)).lora.rank == 4


def test_two_lr_rules_at_once_are_refused_naming_the_api_arguments_and_the_flags() -> None:
    # Through the API the user typed no flag: the message names the argument first, the flag beside it.
    rules = {"lr_range": (1e-5, 1e-3), "layer_decay": 0.7, "lrs": {"head": 1e-3}}
    for left_out in rules:
        given = {name: rule for name, rule in rules.items() if name != left_out}
        with pytest.raises(ThawError, match="^give only one of lr_range \\(--lr-range\\), layer_decay \\(--layer-decay\\) and per-group lrs"):
            build_plan("two-phase", num_groups=6, **given)
    with pytest.raises(ThawError, match="or a YAML plan \\(--config plan.yaml, or load_plan\\)$"):
        build_plan("two_phase", num_groups=6)


README = Path(__file__).resolve().parents[2] / "README.md"


def _readme_yaml_after(marker: str) -> str:
    """The first YAML block of the README after `marker`."""
    text = README.read_text()
    start = text.index("```yaml\n", text.index(marker)) + len("```yaml\n")
    return text[start:text.index("```", start)]


def test_the_readme_top_ten_plan_file_is_head_top_all_less_its_all_stage(tmp_path: Path) -> None:
    path = tmp_path / "top10.yaml"
    path.write_text(_readme_yaml_after("--config top10.yaml"))
    groups = len(build_model("mobilenet_v2", num_classes=3, device="meta", load=False).groups)  # as the README runs it
    full = build_plan("head-top-all", num_groups=groups, top_groups=10)
    assert load_plan(path).stages == full.stages[:-1]
    assert full.stages[-1].name == "all"


def test_head_top_all_on_a_model_of_two_groups_is_two_phase() -> None:
    # the top two groups would be all of them: one stage would repeat the next
    assert [s.name for s in build_plan("head-top-all", num_groups=2).stages] == ["head", "all"]


def test_unknown_strategy_lists_the_valid_ones() -> None:
    with pytest.raises(ThawError, match="feature-extract, fine-tune, two-phase, head-top-all, gradual, lora"):
        build_plan("freeze-all", num_groups=3)


def test_a_plan_file_name_given_as_the_strategy_points_to_load_plan() -> None:
    with pytest.raises(ThawError, match=r"names a file.*thaw.load_plan\('cfg/plan.yaml'\).*training: options of it as TrainConfig"):
        build_plan("cfg/plan.yaml", num_groups=3)


def test_load_plan_warns_of_the_training_options_a_plan_does_not_carry(tmp_path: Path) -> None:
    # Followed alone, the advice above trained with label_smoothing 0.1 and ema on where the file said 0 and false.
    path = tmp_path / "plan.yaml"
    path.write_text("stages:\n  - {name: head, train: [head], epochs: 1}\ntraining: {label_smoothing: 0.0, ema: false}\n")
    with pytest.warns(UserWarning, match=r"has training: options \(label_smoothing, ema\), which a plan does not carry"):
        plan = load_plan(path)
    assert [stage.name for stage in plan.stages] == ["head"]
    path.write_text("stages:\n  - {name: head, train: [head], epochs: 1}\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a file without them: no warning
        load_plan(path)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lr": "1e-3"}, "lr must be a positive finite number"),  # a string from a config file, not a float
        ({"lr": math.nan}, "lr must be a positive finite number"),
        ({"lr_range": ("a", 1e-3)}, "lr range start must be"),
        ({"lr_range": (1e-3,)}, "must be a pair"),
        ({"layer_decay": "0.5"}, "layer decay must be in"),
        ({"layer_decay": math.nan}, "layer decay must be in"),
        ({"lrs": [1e-3]}, "must be a mapping"),
        ({"lrs": {"head": "fast"}}, "lr for head must be"),
        ({"groups_per_stage": "2"}, "groups per stage must be a whole number"),
        ({"groups_per_stage": True}, "groups per stage must be a whole number"),  # a bool is no count
        ({"groups_per_stage": 2.0}, "groups per stage must be a whole number"),
    ],
)
def test_build_plan_refuses_bad_option_values_in_one_line(options: dict, message: str) -> None:
    """Values that are not numbers are refused by build_plan itself, naming the option, not by a TypeError from
    arithmetic on them, nor stages later when the rule is first used."""
    strategy = "gradual" if "groups_per_stage" in options else "two-phase"
    with pytest.raises(ThawError, match=message):
        build_plan(strategy, num_groups=4, **options)


def test_lr_rules_built_by_hand_are_checked_when_built() -> None:
    with pytest.raises(ThawError, match="lr range goes from the stem to the head"):
        RangeLr(1e-3, 1e-5)
    with pytest.raises(ThawError, match="layer decay"):
        DecayLr(1e-3, 1.5)
    with pytest.raises(ThawError, match="lr for head"):
        ExplicitLr({"head": -1.0})


def test_strategies_keep_batchnorm_statistics_once_pretrained_layers_train(resnet50) -> None:
    head, everything = build_plan("two-phase", num_groups=len(resnet50.groups)).stages
    assert head.batchnorm == "frozen" and everything.batchnorm == "eval"
    view = resolve_stage(resnet50, everything)
    assert {g.batchnorm for g in view.groups if g.name != "head"} == {"eval"}
    chosen = build_plan("two-phase", num_groups=len(resnet50.groups), batchnorm="train").stages
    assert {s.batchnorm for s in chosen} == {"train"}


def test_feature_extract_trains_its_head_stage_for_head_epochs_or_epochs_and_refuses_two_numbers() -> None:
    """Its one stage is the head's: --head-epochs sets it (it was ignored), --epochs still does (scripts pass it)."""
    assert [stage.epochs for stage in build_plan("feature-extract", num_groups=4, head_epochs=1).stages] == [1]
    assert [stage.epochs for stage in build_plan("feature-extract", num_groups=4, epochs=2).stages] == [2]
    assert [stage.epochs for stage in build_plan("feature-extract", num_groups=4, epochs=2, head_epochs=2).stages] == [2]
    assert [stage.epochs for stage in build_plan("feature-extract", num_groups=4).stages] == [3]
    with pytest.raises(ThawError, match=r"^feature-extract has one stage, the head's: --head-epochs 1 and --epochs 2 both set"):
        build_plan("feature-extract", num_groups=4, epochs=2, head_epochs=1)
    assert [stage.epochs for stage in build_plan("two-phase", num_groups=4, head_epochs=1).stages] == [1, 3]  # the others as before


def test_a_mistake_in_a_later_stage_names_that_stage(resnet50) -> None:
    from thaw.plan import Plan, resolve_plan

    plan = Plan((Stage("head", 1, ("head",)), Stage("all", 1, ("al",), ConstantLr(5e-4))))
    with pytest.raises(ThawError, match=r"^stage 2/2 'all': selector 'al' matches no parameters; use all, a group"):
        resolve_plan(resnet50, plan)
    both = Plan((*plan.stages, Stage("top", 1, ("layer4",), ExplicitLr({"layer9": 1e-4}))))  # every stage's problem at once
    with pytest.raises(ThawError, match=r"^stage 2/3 'all': selector 'al' .* \| stage 3/3 'top': 'layer9' is neither a layer group"):
        resolve_plan(resnet50, both)


def test_a_reversed_lr_range_or_no_groups_is_refused_from_python_as_from_the_flags(tmp_path: Path) -> None:
    """build_plan by hand gets the checks --lr-range and a plan file make: a reversed range trained the stem at 1e-2
    and the head at 1e-6; num_groups 0 built a plan for no model."""
    from thaw import build_plan
    from thaw.train import train_images

    with pytest.raises(ThawError, match=r"^an lr range goes from the stem to the head, low to high; got 0.01 to 1e-06$"):
        build_plan("fine-tune", num_groups=14, epochs=1, lr_range=(1e-2, 1e-6))
    with pytest.raises(ThawError, match=r"^an lr range goes from the stem to the head, low to high; got 0.01 to 1e-06$"):
        train_images(
            tmp_path / "no-data-needed", model="mobilenet_v3_small", weights=None, plan="fine-tune",
            plan_options={"lr_range": (1e-2, 1e-6)}, out=tmp_path / "run",
        )
    assert not (tmp_path / "run").exists()
    for groups in (0, -1, "5", 2.0):
        with pytest.raises(ThawError, match="num_groups must be a whole number of at least 1"):
            build_plan("gradual", num_groups=groups)


def test_a_head_lr_beside_per_group_lrs_is_refused_in_python_as_on_the_command_line() -> None:
    # lrs name every group's lr, so lr=0.5 beside them went unused without a word
    lrs = {"head": 1e-3, "stem": 1e-5}
    with pytest.raises(ThawError, match=r"^lr 0\.5 sets the head lr where no group's lr is named; beside lrs name it too"):
        build_plan("two-phase", num_groups=3, lr=0.5, lrs=lrs)
    plan = build_plan("two-phase", num_groups=3, lrs=lrs)
    assert [stage.lr for stage in plan.stages] == [ExplicitLr(lrs), ExplicitLr(lrs)]
    assert build_plan("feature-extract", num_groups=3).stages[0].lr == ConstantLr(DEFAULT_HEAD_LR)


@pytest.mark.parametrize("strategy, options, refusal", [
    ("feature-extract", {"lr_range": (1e-5, 1e-2)}, r"^lr_range \(--lr-range\) does nothing for feature-extract: its one stage trains the head"),
    ("lora", {"layer_decay": 0.5}, r"^layer_decay \(--layer-decay\) does nothing for lora: its one stage trains the head and the adapters at one lr"),
    ("fine-tune", {"head_epochs": 7}, r"^head_epochs \(--head-epochs\) does nothing for fine-tune: its one stage is no head stage"),
    ("two-phase", {"groups_per_stage": 3}, r"^groups_per_stage \(--groups-per-stage\) does nothing for two-phase: only gradual"),
    ("lora", {"head_epochs": 5, "lr_range": (1e-5, 1e-2)}, r"^head_epochs \(--head-epochs\) and lr_range \(--lr-range\) do nothing for lora: .*; drop them"),
])
def test_an_option_the_strategy_does_not_use_is_refused_not_dropped(strategy: str, options: dict, refusal: str) -> None:
    # each was dropped without a word: feature-extract trained its head at 1e-3 where --lr-range asked up to 1e-2
    with pytest.raises(ThawError, match=refusal):
        build_plan(strategy, num_groups=5, **options)
    build_plan("gradual", num_groups=5, groups_per_stage=3, layer_decay=0.5, head_epochs=2)  # where each is used
    build_plan("two-phase", num_groups=5, lr_range=(1e-5, 1e-2), head_epochs=2)
    build_plan("feature-extract", num_groups=5, head_epochs=2, groups_per_stage=1)  # 1, the default, changes nothing
    with pytest.raises(ThawError, match=r"^lr_range \(--lr-range\) does nothing for feature-extract: its one stage trains the head at one lr"):
        build_plan("feature-extract", num_groups=5, lr_range=np.array([1e-5, 1e-2]))  # an array has no truth value: was a ValueError


def test_an_lr_named_for_a_group_no_stage_trains_is_refused_not_ignored(resnet50) -> None:
    lrs = {"layer1.0": 1e-5, "fc": 1e-3}  # a module inside layer1, and the head
    refusal = r"^an lr is given for layer1\.0 \(in group layer1\), which no stage of the plan trains"
    with pytest.raises(ThawError, match=refusal):
        check_named_lrs_are_trained(resnet50, build_plan("feature-extract", num_groups=len(resnet50.groups), lrs=lrs))
    head_then_layer1 = Plan((Stage("head", 1, ("head",), ExplicitLr(lrs)), Stage("more", 1, ("layer1", "head"), ExplicitLr(lrs))))
    check_named_lrs_are_trained(resnet50, head_then_layer1)  # a later stage trains layer1: in use
    skipped = Plan((head_then_layer1.stages[0], Stage("more", 0, ("layer1", "head"), ExplicitLr(lrs))))
    with pytest.raises(ThawError, match=refusal):  # a stage of 0 epochs trains nothing
        check_named_lrs_are_trained(resnet50, skipped)
    # resolving alone never refuses it: a run saved before the check still reports and resumes
    resolve_plan(resnet50, build_plan("feature-extract", num_groups=len(resnet50.groups), lrs=lrs))


def test_a_mistake_repeated_in_many_stages_is_shown_for_the_first_three_and_counted_for_the_rest() -> None:
    # gradual's stages each left groups without an lr: one line of every stage's problem ran to 6 KB
    mobilenet = build_model("mobilenet_v2", weights=None, num_classes=2, device="meta")
    plan = build_plan("gradual", num_groups=len(mobilenet.groups), lrs={"features.18": 1e-4, "head": 1e-3})
    with pytest.raises(ThawError) as refused:
        resolve_plan(mobilenet, plan)
    parts = str(refused.value).split(" | ")
    assert [part.split(":")[0] for part in parts[:3]] == [f"stage {i}/20 '{plan.stages[i - 1].name}'" for i in (3, 4, 5)]
    assert parts[3:] == ["and 15 more stages with problems"]  # stages 6 to 20
    assert len(str(refused.value)) < 1000


@pytest.mark.parametrize("backbone, top", [("mobilenet_v2", 10), ("tf_efficientnet_lite0", 4)])
def test_the_benchmarks_top_half_recipes_take_half_the_backbones_groups(backbone: str, top: int) -> None:
    """A fixed 10 was every group of a 9-group model, which build_plan refuses: the recipe would not run there."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("recipes", Path(__file__).parents[2] / "benchmarks" / "recipes.py")
    recipes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipes)
    strategy, options = recipes.recipe_plan("thaw-top-half", {"epochs": 3, "head_epochs": 3}, backbone)
    assert strategy == "head-top-all" and options["top_groups"] == top
    plan, _ = recipes.recipe_plan("thaw-top-half-only", {"epochs": 3, "head_epochs": 3}, backbone)
    assert [stage.name for stage in plan.stages] == ["head", f"top{top}"]


def test_the_plan_api_names_a_wrong_argument_in_one_line(resnet50) -> None:
    # each was an AttributeError or TypeError from deep inside (no group_names on a module, .strip on an int, ...)
    refusals = {
        r"^resolve takes a ModelAdapter, got a ResNet; wrap the model with thaw\.adapt\(model\)$": lambda: resolve(resnet50.model, ["head"]),
        r"^apply_stage takes a ModelAdapter, got a ResNet": lambda: apply_stage(resnet50.model, Stage("a", 1)),
        r"^expected a list of selectors like \['head', 'layer4'\], got \[5\]$": lambda: resolve(resnet50, [5]),
        r"^expected a list of selectors like \['head', 'layer4'\], got None$": lambda: resolve(resnet50, None),
        r"^apply_stage takes a thaw\.Stage \(a plan's stages are some\), got 'two-phase'$": lambda: apply_stage(resnet50, "two-phase"),
        r"^resolve_stage takes a thaw\.Stage": lambda: resolve_stage(resnet50, "head"),
        r"^plan_report takes a thaw\.Plan, got 'two-phase'; for a strategy: thaw\.build_plan": lambda: plan_report(resnet50, "two-phase", "resnet50"),
        r"^a plan's stages are thaw\.Stage objects, got \('a',\)$": lambda: Plan(("a",)),
        r"^a plan file is a path to a YAML file, got None$": lambda: load_plan(None),
        r"^count_parameters takes a model \(an nn\.Module or a ModelAdapter\), got 'x'$": lambda: count_parameters("x"),
        r"^audit_optimizer takes a torch optimizer \(thaw\.build_optimizer gives one\), got 'adam'$": lambda: audit_optimizer(resnet50, "adam"),
        r"^audit_optimizer takes a model \(an nn\.Module or a ModelAdapter\), got 'resnet50'$": lambda: audit_optimizer("resnet50", None),
        r"^build_optimizer takes a resolved stage \(thaw\.resolve_stage\(adapter, stage\) gives one\), got Stage$": lambda: build_optimizer(resnet50, Stage("a", 1)),
        r"^build_optimizer takes a ModelAdapter, got a ResNet; wrap the model with thaw\.adapt\(model\)$": lambda: build_optimizer(resnet50.model, None),
        r"^apply_trainable takes a ModelAdapter, got a ResNet": lambda: apply_trainable(resnet50.model, ["fc.weight"]),
        r"^apply_trainable takes a list of parameter names, like \['fc\.weight', 'fc\.bias'\], got 5$": lambda: apply_trainable(resnet50, 5),
        r"^trainable_line takes two parameter counts \(count_parameters gives them\), got '1' and 2$": lambda: trainable_line("1", 2),
    }
    for refusal, call in refusals.items():
        with pytest.raises(ThawError, match=refusal):
            call()
    assert count_parameters(resnet50) == count_parameters(resnet50.model)  # the adapter's model, counted
    assert trainable_line(np.int64(5), np.int64(10)) == trainable_line(5, 10) == "Trainable: 5 / 10 (50.0%)"  # numpy counts are counts
    head = [name for name, _ in resnet50.model.named_parameters() if name.startswith("fc.")]
    assert apply_trainable(resnet50, dict.fromkeys(head).keys()) == apply_trainable(resnet50, (name for name in head))  # any iterable
