"""Plans: a list of stages, each saying what trains, at which lrs, with which BatchNorm policy.

A plan is pure data (frozen dataclasses). `resolve_stage` turns a stage into
numbers for one model without changing the model: what `thaw plan` prints and
what the training loop applies.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field

from thaw._numbers import as_real, as_whole, short_repr
from thaw.errors import ThawError
from thaw.models.adapter import ModelAdapter, check_adapter
from thaw.models.lora import LoraSpec, adapter_param_names
from thaw.plan import selectors
from thaw.plan.freeze import BATCHNORM_POLICIES, BatchNormPolicy, batchnorm_layers, batchnorm_trains, locks_statistics, trainable_names
from thaw.plan.lr import ConstantLr, ExplicitLr, LrRule, check_lr

LR_RULES = typing.get_args(LrRule)
# Far beyond any fine-tune; above it a count is a typo (1e11), and one no float holds stopped the run in its schedule
# after the data was read, with a traceback.
MAX_EPOCHS = 1_000_000


@dataclass(frozen=True)
class Stage:
    name: str
    epochs: int
    train: tuple[str, ...] = ("head",)
    lr: LrRule = ConstantLr(1e-3)
    weight_decay: float = 0.01
    batchnorm: BatchNormPolicy = "frozen"

    def __post_init__(self) -> None:
        """A stage built by hand is held to a plan file's rules, all problems at once (plan files are checked before
        they build one, with each key's place named)."""
        problems = []
        if not isinstance(self.name, str) or not self.name:  # every message and the run's record name the stage by it
            problems.append(f"name must be a name like 'head', got {self.name!r}")
        epochs = as_whole(self.epochs)  # any integer type (numpy's too), kept as a plain int: a plan is written to JSON
        if epochs is None or not 0 <= epochs <= MAX_EPOCHS:
            problems.append(f"epochs must be a whole number from 0 to {MAX_EPOCHS:,}, got {short_repr(self.epochs)}")
        else:
            object.__setattr__(self, "epochs", epochs)
        decay = as_real(self.weight_decay)  # any real type (numpy's too), kept as a plain float
        if decay is None or not math.isfinite(decay) or decay < 0:
            problems.append(f"weight decay must be a finite number >= 0, got {self.weight_decay!r}")
        else:
            object.__setattr__(self, "weight_decay", decay)
        if self.batchnorm not in BATCHNORM_POLICIES:
            problems.append(f"batchnorm must be one of {', '.join(BATCHNORM_POLICIES)}, got {self.batchnorm!r}")
        if not isinstance(self.lr, LR_RULES):
            problems.append(f"lr must be a rule such as ConstantLr(1e-3), RangeLr or DecayLr (thaw.plan.lr), got {self.lr!r}")
        if isinstance(self.train, str) or not self.train:
            problems.append(f"train must be a list of selectors like ['head'], got {self.train!r}")
        if problems:
            raise ThawError(f"stage {self.name!r}: " + "; ".join(problems))


@dataclass(frozen=True)
class Plan:
    stages: tuple[Stage, ...]
    lora: LoraSpec | None = None  # adapters added to the model before the first stage

    def __post_init__(self) -> None:
        if not isinstance(self.stages, (list, tuple)) or not all(isinstance(stage, Stage) for stage in self.stages):
            raise ThawError(f"a plan's stages are thaw.Stage objects, got {self.stages!r}")
        if not self.stages:
            raise ThawError("a plan needs at least one stage")
        if all(stage.epochs == 0 for stage in self.stages):  # the run would end with no epoch and no best model
            names = ", ".join(str(stage.name) for stage in self.stages)
            raise ThawError(
                f"every stage of the plan ({names}) has 0 epochs, so nothing would train; give a stage 1 epoch or more "
                "(on the command line: --epochs, --head-epochs)"
            )


def check_stage_names(plan: Plan) -> None:
    """A new plan's stages have names of their own: the summary's delivered epoch, the budget's split and the progress
    name a stage by its name. (Not checked where a saved plan is read back: a run made before this check still loads.)"""
    names = [str(stage.name) for stage in plan.stages]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ThawError(f"stage names must differ: {', '.join(map(repr, repeated))} names more than one stage; rename them")


@dataclass(frozen=True)
class GroupView:
    name: str
    params: int
    trainable: int
    lr: float | None
    weight_decay: float | None
    batchnorm: str | None


@dataclass(frozen=True)
class ResolvedStage:
    stage: Stage
    trainable: tuple[str, ...]
    group_lrs: dict[str, float] = field(repr=False)
    groups: tuple[GroupView, ...] = ()

    @property
    def trainable_params(self) -> int:
        return sum(g.trainable for g in self.groups)

    @property
    def total_params(self) -> int:
        return sum(g.params for g in self.groups)


def _explicit_group_lrs(adapter: ModelAdapter, rule: ExplicitLr) -> dict[str, float]:
    """Map `--lr NAME=LR` names (groups, or modules inside groups) onto groups."""
    by_group: dict[str, float] = {}
    for name, lr in rule.by_name.items():
        group = name if name in adapter.group_names else selectors.group_of_module(adapter, name)
        lr = check_lr(lr, f"lr for {name}")
        if group in by_group and by_group[group] != lr:
            raise ThawError(f"two lrs given for group {group!r} ({by_group[group]:g} and {lr:g}, via {name!r})")
        by_group[group] = lr
    return by_group


def _numel(adapter: ModelAdapter) -> dict[str, int]:
    return {name: p.numel() for name, p in adapter.model.named_parameters()}


def _check_every_trainable_group_has_lr(
    adapter: ModelAdapter, rule: ExplicitLr, lrs: dict[str, float], trainable: set[str]
) -> None:
    numel = _numel(adapter)
    left_out = []
    for group in adapter.groups:
        count = sum(numel[p] for p in group.params if p in trainable)
        if count and group.name not in lrs:
            modules = f" ({', '.join(group.modules)})" if group.modules != (group.name,) else ""
            left_out.append((f"{group.name}{modules}", count))
    if left_out:
        missing = sum(count for _, count in left_out)
        total = sum(numel[p] for p in trainable)
        listed = ", ".join(f"{name}: {count:,}" for name, count in left_out)
        raise ThawError(
            f"lrs given for {', '.join(rule.by_name)} leave {missing:,} of {total:,} trainable parameters "
            f"in no optimizer group: {listed}; give each an lr (lrs in a plan file, --lr NAME=LR on the"
            " command line), use lr_range or layer_decay (--lr-range, --layer-decay), or freeze them"
        )


def _batchnorm_by_group(adapter: ModelAdapter, trainable: set[str], policy: BatchNormPolicy) -> dict[str, str]:
    """What each group's BatchNorm layers do in this stage (train, frozen or eval), by the rule apply_trainable applies."""
    trains: dict[str, bool] = {}
    for name, layer in batchnorm_layers(adapter.model):
        try:
            group = selectors.group_of_module(adapter, name)
        except ThawError:  # outside every group: not part of any group's report
            continue
        trains[group] = trains.get(group, False) or batchnorm_trains(adapter, name, layer, trainable)
    return {group: _statistics(policy, any_trains) for group, any_trains in trains.items()}


def _statistics(policy: BatchNormPolicy, trains: bool) -> str:
    """The label `thaw plan` shows: eval and frozen hold statistics fixed (locks_statistics), train updates them."""
    return policy if locks_statistics(policy, trains) else "train"


def resolve_stage(adapter: ModelAdapter, stage: Stage) -> ResolvedStage:
    """What a stage means for this model: trainable parameters and each group's lr, wd and BatchNorm policy."""
    check_adapter(adapter, "resolve_stage")
    if not isinstance(stage, Stage):  # a strategy's name was an AttributeError on a str
        raise ThawError(f"resolve_stage takes a thaw.Stage (a plan's stages are some), got {stage!r}")
    if stage.epochs < 0:
        raise ThawError(f"stage {stage.name!r}: epochs must be 0 or more, got {stage.epochs}")
    trainable = set(trainable_names(adapter, selectors.resolve(adapter, stage.train), stage.batchnorm))
    if isinstance(stage.lr, ExplicitLr):
        lrs = _explicit_group_lrs(adapter, stage.lr)
        _check_every_trainable_group_has_lr(adapter, stage.lr, lrs, trainable)
    else:
        lrs = stage.lr.lrs(adapter.group_names)
    numel, bn = _numel(adapter), _batchnorm_by_group(adapter, trainable, stage.batchnorm)
    views = []
    for group in adapter.groups:
        count = sum(numel[p] for p in group.params if p in trainable)
        views.append(
            GroupView(
                name=group.name,
                params=sum(numel[p] for p in group.params),
                trainable=count,
                lr=lrs.get(group.name) if count else None,
                weight_decay=stage.weight_decay if count else None,
                batchnorm=bn.get(group.name),
            )
        )
    ordered = tuple(name for name in numel if name in trainable)
    return ResolvedStage(stage, ordered, {v.name: v.lr for v in views if v.lr is not None}, tuple(views))


def resolve_plan(adapter: ModelAdapter, plan: Plan) -> tuple[ResolvedStage, ...]:
    """Every stage resolved for this model, every stage's problem reported at once and named by its stage: a selector
    that matches nothing or an lr for no group in a later stage is found before the first stage trains, not when the
    later one starts. Epochs play no part in it, so a budget that changes them later changes nothing here."""
    resolved, problems = [], []
    for index, stage in enumerate(plan.stages, 1):
        try:
            resolved.append(resolve_stage(adapter, stage))
        except ThawError as error:
            problems.append(f"stage {index}/{len(plan.stages)} {stage.name!r}: {error}")
    if problems:
        raise ThawError(" | ".join(_first_problems(problems)))
    return tuple(resolved)


def check_new_plan(adapter: ModelAdapter, plan: Plan, resolved: tuple[ResolvedStage, ...] | None = None) -> None:
    """What a new plan (thaw plan, a new run) must hold beyond resolving: a run saved before these checks still
    reports and resumes. `resolved`: the plan already resolved for `adapter`, where the caller has it."""
    resolved = resolved if resolved is not None else resolve_plan(adapter, plan)
    check_named_lrs_are_trained(adapter, plan, resolved)
    _check_adapters_train(adapter, plan, resolved)


def _check_adapters_train(adapter: ModelAdapter, plan: Plan, resolved: tuple[ResolvedStage, ...]) -> None:
    """A plan's lora: adds adapters; where no stage trains them (a stage of 0 epochs trains nothing) they stay at their
    start (B = 0: they change nothing) and the run saves them as if they had learned: refused, as the --lora-* flags
    beside another strategy are."""
    if plan.lora is None:
        return
    adapters = set(adapter_param_names(adapter.model))
    if adapters and not any(adapters.intersection(stage.trainable) for stage in resolved if stage.stage.epochs):
        raise ThawError(
            "the plan's lora: adds adapters that no stage trains; add 'adapters' to a stage's train list "
            "(as the lora strategy's [head, adapters]), or drop lora:"
        )


PROBLEMS_SHOWN = 3  # a gradual plan of 19 stages repeated one mistake 18 times: a 6 KB line nobody reads


def _first_problems(problems: list[str]) -> list[str]:
    if len(problems) <= PROBLEMS_SHOWN:
        return problems
    hidden = len(problems) - PROBLEMS_SHOWN
    return problems[:PROBLEMS_SHOWN] + [f"and {hidden} more stage{'s' if hidden > 1 else ''} with problems"]


def check_named_lrs_are_trained(adapter: ModelAdapter, plan: Plan, resolved: tuple[ResolvedStage, ...] | None = None) -> None:
    """An lr named for a group that no stage trains was ignored without a word: whoever named it meant it to train
    (`--strategy feature-extract --lr features.0=1e-4`). An lr for a group a later stage trains is in use; a stage of
    0 epochs trains nothing. For new plans only (thaw plan, a new run): a run saved before this check still reports
    and resumes."""
    resolved = resolved if resolved is not None else resolve_plan(adapter, plan)
    trained = {group.name for stage in resolved if stage.stage.epochs for group in stage.groups if group.trainable}
    unused: dict[str, str] = {}
    for stage in resolved:
        if isinstance(stage.stage.lr, ExplicitLr):
            for name in stage.stage.lr.by_name:
                group = name if name in adapter.group_names else selectors.group_of_module(adapter, name)
                if group not in trained:
                    unused[name] = group
    if unused:
        named = ", ".join(name if name == group else f"{name} (in group {group})" for name, group in unused.items())
        raise ThawError(f"an lr is given for {named}, which no stage of the plan trains; drop it, or train it in a stage")
