"""The built-in strategies, named after the seed recipe.

Defaults follow fastai's fine_tune, whose values hold across many datasets:
AdamW at 1e-3 for a new head; once everything trains, the head lr halves and
the stem trains 100x slower than the head (a geometric range in between).

BatchNorm: head-only stages use `frozen`; stages that train pretrained layers
use `eval` (Keras's fine-tuning advice). Letting BatchNorm switch to batch
statistics at the unfreeze changes the features the head was trained on; on
upscaled digits that took val accuracy from 0.83 to 0.28 (benchmarks/batchnorm_policy.py).
"""

from __future__ import annotations

import inspect
import math

from thaw._numbers import as_real, as_whole, short_repr
from thaw.errors import ThawError
from thaw.models.lora import LoraSpec
from thaw.plan.config import unknown_keys
from thaw.plan.freeze import BatchNormPolicy
from thaw.plan.lr import ConstantLr, DecayLr, ExplicitLr, LrRule, RangeLr, check_lr
from thaw.plan.stages import Plan, Stage

STRATEGIES = ("feature-extract", "fine-tune", "two-phase", "head-top-all", "gradual", "lora")
DEFAULT_EPOCHS = 3  # per stage, the head stage's and the others', where none are given
TOP_GROUPS = 2  # head-top-all: the last pretrained group and the head train between the head and everything
DEFAULT_HEAD_LR = 1e-3
AFTER_HEAD_PHASE_FACTOR = 0.5  # fastai halves the lr once the head is trained
STEM_TO_HEAD_RATIO = 100.0  # fastai's lr_mult
HEAD_STAGE_BATCHNORM: BatchNormPolicy = "frozen"
UNFROZEN_STAGE_BATCHNORM: BatchNormPolicy = "eval"


def unfrozen_rule(
    head_lr: float,
    *,
    lr_range: tuple[float, float] | None = None,
    layer_decay: float | None = None,
    lrs: dict[str, float] | None = None,
) -> LrRule:
    """The lr rule for a stage that trains more than the head."""
    chosen = [option for option in (lr_range, layer_decay, lrs) if option]
    if len(chosen) > 1:
        raise ThawError("give only one of lr_range (--lr-range), layer_decay (--layer-decay) and per-group lrs (--lr NAME=LR)")
    if lrs:
        return ExplicitLr(dict(lrs))
    if lr_range:
        if isinstance(lr_range, (str, bytes)) or not hasattr(lr_range, "__len__") or len(lr_range) != 2:
            raise ThawError(f"lr_range (--lr-range) must be a pair (low, high) from the stem to the head, got {lr_range!r}")
        return RangeLr(*lr_range)
    if layer_decay is not None:
        return DecayLr(head_lr, layer_decay)
    return RangeLr(head_lr / STEM_TO_HEAD_RATIO, head_lr)


def default_strategy(task: str) -> str:
    """The strategy when none is given. Images: the head, then the top 2 groups, then all (measured best over
    three image sets; the top stage trains on the frozen bottom's cached output, so it costs little). Text: two-phase."""
    return "head-top-all" if task == "image" else "two-phase"


def build_plan(
    strategy: str,
    *,
    num_groups: int,
    epochs: int | None = None,
    head_epochs: int | None = None,
    lr: float | None = None,
    lr_range: tuple[float, float] | None = None,
    layer_decay: float | None = None,
    lrs: dict[str, float] | None = None,
    weight_decay: float = 0.01,
    batchnorm: BatchNormPolicy | None = None,
    groups_per_stage: int = 1,
    top_groups: int | None = None,
    lora: LoraSpec | None = None,
) -> Plan:
    """A plan for one of STRATEGIES. `head_epochs`: the head-only stage's epochs; `epochs`: every other stage's
    (DEFAULT_EPOCHS each where not given). feature-extract's one stage is a head stage, and takes either (see
    _head_only_epochs); fine-tune's and lora's one stage takes `epochs`.

    `batchnorm` sets every stage's policy; by default head stages use frozen, the others eval.
    `top_groups`: how many groups head-top-all's middle stage trains, the head included (TOP_GROUPS when None; the
    top half of mobilenet_v2's groups was measured against the top 2: benchmarks/recipes.py, README).
    """
    groups = as_whole(num_groups)  # any integer type (numpy's too), as epochs take
    if groups is None or groups < 1:  # a model's groups: the head at least
        raise ThawError(f"num_groups must be a whole number of at least 1 (the model's parameter groups), got {num_groups!r}")
    num_groups = groups
    decay = as_real(weight_decay)
    if decay is None or not math.isfinite(decay) or decay < 0:
        raise ThawError(f"weight decay must be a finite number >= 0, got {weight_decay!r}")
    weight_decay = decay
    if top_groups is not None and strategy in STRATEGIES and strategy != "head-top-all":  # else it would be ignored without a word
        raise ThawError(f"top groups set head-top-all's middle stage; the strategy here is {strategy}: drop them or use head-top-all")
    if lora is not None and not isinstance(lora, LoraSpec):  # a dict was an AttributeError once the model was built
        raise ThawError(f"lora must be a LoraSpec (thaw.models.lora.LoraSpec(rank=4)), got {lora!r}")
    if lora is not None and strategy in STRATEGIES and strategy != "lora":  # else it would be ignored without a word
        raise ThawError(f"lora sets the LoRA adapters; the strategy here is {strategy}: drop it or use lora")
    unused = unused_options(strategy, head_epochs=head_epochs, lr_range=lr_range, layer_decay=layer_decay, groups_per_stage=groups_per_stage)
    if unused:  # else they would be ignored without a word
        them = "it" if len(unused) == 1 else "them"
        named = " and ".join(f"{name} (--{name.replace('_', '-')})" for name in unused)
        trained = "the head and the adapters" if strategy == "lora" else "the head"
        reasons = "; ".join(dict.fromkeys(UNUSED_BECAUSE[name].format(trained=trained) for name in unused))
        raise ThawError(f"{named} {'does' if len(unused) == 1 else 'do'} nothing for {strategy}: {reasons}; "
                        f"drop {them}, or choose a strategy that uses {them}")
    top = TOP_GROUPS if top_groups is None else _top_group_count(top_groups)
    if top_groups is not None and strategy == "head-top-all" and top >= num_groups:  # else the top stage would go without a word
        raise ThawError(
            f"top groups {top}: the model has {num_groups} groups, the head included, so that stage would train all of them, "
            f"as the all stage after it does; give fewer than {num_groups}, or use two-phase"
        )
    if lrs is not None and not isinstance(lrs, dict):
        raise ThawError(f"lrs (--lr NAME=LR) must be a mapping of group or module names to lrs, got {lrs!r}")
    if lrs and lr is not None:  # per-group lrs name every group's: the head lr would go unused, unsaid
        raise ThawError(f"lr {lr!r} sets the head lr where no group's lr is named; beside lrs name it too, as lrs={{'head': {lr!r}, ...}}")
    lr = DEFAULT_HEAD_LR if lr is None else check_lr(lr, "lr")  # here, before arithmetic on it turns a string into a TypeError
    if strategy == "feature-extract":
        head_epochs = _head_only_epochs(epochs, head_epochs)
    epochs = DEFAULT_EPOCHS if epochs is None else epochs
    head_epochs = DEFAULT_EPOCHS if head_epochs is None else head_epochs
    head_rule: LrRule = ExplicitLr(dict(lrs)) if lrs else ConstantLr(lr)
    later_lr = lr * AFTER_HEAD_PHASE_FACTOR
    head_only = {"weight_decay": weight_decay, "batchnorm": batchnorm or HEAD_STAGE_BATCHNORM}
    unfrozen = {"weight_decay": weight_decay, "batchnorm": batchnorm or UNFROZEN_STAGE_BATCHNORM}
    rule_options = {"lr_range": lr_range, "layer_decay": layer_decay, "lrs": lrs}
    if strategy == "feature-extract":
        stages = [Stage("head", head_epochs, ("head",), head_rule, **head_only)]
    elif strategy == "fine-tune":
        stages = [Stage("all", epochs, ("all",), unfrozen_rule(lr, **rule_options), **unfrozen)]
    elif strategy == "two-phase":
        stages = [
            Stage("head", head_epochs, ("head",), head_rule, **head_only),
            Stage("all", epochs, ("all",), unfrozen_rule(later_lr, **rule_options), **unfrozen),
        ]
    elif strategy == "head-top-all":
        later = unfrozen_rule(later_lr, **rule_options)
        stages = [Stage("head", head_epochs, ("head",), head_rule, **head_only)]
        if num_groups > top:  # with as many groups or fewer the top ones are all of them: two-phase
            stages.append(Stage(f"top{top}", epochs, (f"-{top}:",), later, **unfrozen))
        stages.append(Stage("all", epochs, ("all",), later, **unfrozen))
    elif strategy == "gradual":
        later = unfrozen_rule(later_lr, **rule_options)
        stages = _gradual(num_groups, head_epochs, epochs, head_rule, later, groups_per_stage, head_only, unfrozen)
    elif strategy == "lora":
        # Pretrained weights stay frozen (BatchNorm too, unless --batchnorm train); adapters and head train.
        return Plan((Stage("lora", epochs, ("head", "adapters"), head_rule, **head_only),), lora or LoraSpec())
    elif isinstance(strategy, str) and strategy.lower().endswith((".yaml", ".yml")):
        raise ThawError(
            f"plan {strategy!r} names a file, not a strategy: pass thaw.load_plan({strategy!r}) as the plan, and any "
            f"training: options of it as TrainConfig(**options) (plan, options = thaw.plan.config.read_plan_file(...)); "
            f"on the command line, --config {strategy} reads both"
        )
    else:
        raise ThawError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}, or a YAML plan (--config plan.yaml, or load_plan)")
    return Plan(tuple(stages))


# Options a strategy has no use for, and why: given, they were dropped without a word.
UNUSED_BECAUSE = {
    "head_epochs": "its one stage is no head stage (--epochs sets it)",
    "lr_range": "its one stage trains {trained} at one lr, which lr (--lr) sets",
    "layer_decay": "its one stage trains {trained} at one lr, which lr (--lr) sets",
    "groups_per_stage": "only gradual unfreezes groups stage by stage",
}
UNUSED_WHEN_UNSET = {"head_epochs": None, "lr_range": None, "layer_decay": None, "groups_per_stage": 1}
HEAD_ONLY_LR = ("feature-extract", "lora")  # their one stage trains the head (and adapters) at one lr


def unused_options(strategy: str, **given: object) -> list[str]:
    """The options of UNUSED_WHEN_UNSET in `given`, set to other than that, which `strategy` does not use."""
    uses = {
        "head_epochs": strategy not in ("fine-tune", "lora"),
        "lr_range": strategy not in HEAD_ONLY_LR,
        "layer_decay": strategy not in HEAD_ONLY_LR,
        "groups_per_stage": strategy == "gradual",
    }
    if strategy not in STRATEGIES:  # refused as unknown below
        return []
    def is_set(name: str, value: object) -> bool:  # `is` for None: an lr range given as a numpy array has no truth value
        unset = UNUSED_WHEN_UNSET[name]
        return value is not None if unset is None else value != unset

    return [name for name, value in given.items() if not uses[name] and is_set(name, value)]


def _head_only_epochs(epochs: int | None, head_epochs: int | None) -> int | None:
    """feature-extract's one stage trains the head alone, so --head-epochs sets it; --epochs does too, as it did
    before --head-epochs applied here (scripts pass it). Two different numbers for one stage are refused."""
    if epochs is not None and head_epochs is not None and epochs != head_epochs:
        raise ThawError(
            f"feature-extract has one stage, the head's: --head-epochs {head_epochs} and --epochs {epochs} both set its "
            "epochs; give one of them"
        )
    return epochs if head_epochs is None else head_epochs


def _top_group_count(count: object) -> int:
    whole = as_whole(count)  # numpy integers too; not floats, strings or bools
    if whole is None or whole < 2:
        raise ThawError(f"top groups must be a whole number of at least 2 (the head alone is the head stage), got {short_repr(count)}")
    return whole


def _gradual(
    num_groups: int,
    head_epochs: int,
    epochs: int,
    head_rule: LrRule,
    rule: LrRule,
    step: int,
    head_only: dict,
    unfrozen: dict,
) -> list[Stage]:
    """ULMFiT-style: the head, then one more group from the top each stage, until all train."""
    whole = as_whole(step)
    if whole is None or whole < 1:
        raise ThawError(f"groups per stage must be a whole number of at least 1, got {short_repr(step)}")
    step = whole
    stages = [Stage("head", head_epochs, ("head",), head_rule, **head_only)]
    for count in range(1 + step, num_groups + step, step):
        count = min(count, num_groups)
        train = ("all",) if count == num_groups else (f"-{count}:",)
        name = "all" if count == num_groups else f"top{count}"
        stages.append(Stage(name, epochs, train, rule, **unfrozen))
    return stages


def check_plan_options(options: dict) -> None:
    """Refuse plan options build_plan does not take, with the nearest it does (`epoch` for `epochs`, say)."""
    if not isinstance(options, dict):  # a string was read letter by letter, as unknown options 'e', 'p', ...
        raise ThawError(f"plan_options must be a dict of build_plan's options, like {{'epochs': 3}}, got {options!r}")
    known = tuple(name for name in inspect.signature(build_plan).parameters if name not in ("strategy", "num_groups"))
    problems = unknown_keys(options, known, "", kind="plan option")
    if problems:
        raise ThawError("; ".join(problems))
