"""Plans from YAML. Every problem in the file is reported at once, with the nearest valid key."""

from __future__ import annotations

import difflib
import os
import math
import re
import warnings
from pathlib import Path
from typing import Any, Callable

import yaml

from thaw._numbers import is_decimal, short_repr
from thaw.errors import ThawError, join_problems
from thaw.plan.freeze import BATCHNORM_POLICIES
from thaw.plan.lr import MAX_LR, ConstantLr, DecayLr, ExplicitLr, LrRule, RangeLr
from thaw.models.lora import MAX_LORA_RANK, LoraSpec
from thaw.plan.stages import MAX_EPOCHS, Plan, Stage, check_stage_names

PLAN_KEYS = ("stages", "weight_decay", "batchnorm", "lora")
# Recipe options a plan file may carry beside its stages (TrainConfig fields; `thaw train` flags typed on the command
# line win). Their values are checked where the TrainConfig is made, like the flags'.
TRAINING_NUMBERS: dict[str, type] = {"label_smoothing": float, "progressive_resize": float, "mixup": float, "cutmix": float, "cache_views": int}
TRAINING_KEYS = ("label_smoothing", "ema", "cache_views", "cache_prefix", "progressive_resize", "auto_augment", "mixup", "cutmix", "budget")
LORA_KEYS = ("rank", "alpha", "dropout", "targets")
STAGE_KEYS = ("name", "epochs", "train", "lr", "lr_range", "layer_decay", "lrs", "weight_decay", "batchnorm")
EXAMPLE = "stages: [{name: head, epochs: 3, train: [head], lr: 1.0e-3}]"


def unknown_keys(mapping: dict, allowed: tuple[str, ...], where: str, kind: str = "key") -> list[str]:
    """A problem for each key of `mapping` outside `allowed`, with the nearest allowed one (or all of them)."""
    problems = []
    for key in mapping:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (valid: {', '.join(allowed)})"
            problems.append(f"{where}: unknown {kind} {key!r}{hint}" if where else f"unknown {kind} {key!r}{hint}")
    return problems


def _number(value: Any, where: str, problems: list[str]) -> float | None:
    """A finite number, or None with the problem noted. YAML reads 1e-3 (no dot) as a string:
    it is accepted as the number users meant; true/false, NaN and infinities are not numbers here."""
    read = _decimal_written(value)
    if isinstance(read, bool) or not isinstance(read, (int, float)):
        problems.append(f"{where}: expected a number, got {value!r}")
        return None
    try:
        number = float(read)
    except OverflowError:  # an int too large for a float
        number = math.inf
    if not math.isfinite(number):
        problems.append(f"{where}: expected a finite number, got {value!r}")
        return None
    return number


def _in_range(value: Any, where: str, problems: list[str], valid: Callable[[float], bool], expected: str) -> float | None:
    number = _number(value, where, problems)
    if number is not None and not valid(number):
        problems.append(f"{where}: expected {expected}, got {value!r}")
        return None
    return number


def _lr(value: Any, where: str, problems: list[str]) -> float | None:
    return _in_range(value, where, problems, lambda lr: 0 < lr <= MAX_LR, f"a positive lr up to {MAX_LR:g}, like 1.0e-3")


def _weight_decay(value: Any, where: str, problems: list[str]) -> float | None:
    return _in_range(value, where, problems, lambda wd: wd >= 0, "a weight decay >= 0 like 0.01")


def _whole(value: Any, where: str, problems: list[str], low: int, high: int | None = None) -> int | None:
    value = _whole_written(value)  # `epochs: "3"`: the number meant, as an lr in quotes is
    if isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high):
        return value
    bound = f">= {low}" if high is None else f"from {low} to {high}"
    problems.append(f"{where}: expected a whole number {bound}, got {short_repr(value)}")
    return None


def _names(value: Any, where: str, problems: list[str], example: str) -> tuple[str, ...] | None:
    """A selector or a list of selectors (names, globs, index ranges; YAML may read an index as an int)."""
    items = [value] if isinstance(value, (str, int)) else value
    if not isinstance(items, list) or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in items):
        problems.append(f"{where}: expected a selector or a list of selectors like {example}, got {value!r}")
        return None
    return tuple(str(item) for item in items)


def _lr_rule(raw: dict, where: str, problems: list[str]) -> LrRule | None:
    given = [k for k in ("lr_range", "layer_decay", "lrs") if k in raw]
    if len(given) > 1:
        problems.append(f"{where}: give only one of lr_range, layer_decay, lrs")
        return None
    if "lr" in raw and given in (["lr_range"], ["lrs"]):
        problems.append(f"{where}: lr and {given[0]} both set the lrs; keep one (lr goes with layer_decay)")
        return None
    if "lrs" in raw:
        if not isinstance(raw["lrs"], dict) or not raw["lrs"]:
            problems.append(f"{where}.lrs: expected a mapping of group or module names to lrs")
            return None
        values = {str(k): _lr(v, f"{where}.lrs.{k}", problems) for k, v in raw["lrs"].items()}
        return ExplicitLr(values) if None not in values.values() else None  # type: ignore[arg-type]
    if "lr_range" in raw:
        pair = raw["lr_range"]
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            problems.append(f"{where}.lr_range: expected [low, high]")
            return None
        low, high = (_lr(v, f"{where}.lr_range", problems) for v in pair)
        if low is None or high is None:
            return None
        if low > high:
            problems.append(f"{where}.lr_range: expected [low, high] from stem to head with low <= high, got {pair!r}")
            return None
        return RangeLr(low, high)
    if isinstance(raw.get("lr"), dict):  # one lr per group is its own key: say so, not just "expected a number"
        problems.append(f"{where}.lr: one lr for the stage; give each group its own under lrs, like lrs: {{features.18: 1.0e-4, head: 1.0e-3}}")
        return None
    lr = _lr(raw.get("lr", 1e-3), f"{where}.lr", problems)
    if lr is None:
        return None
    if "layer_decay" in raw:
        decay = _in_range(raw["layer_decay"], f"{where}.layer_decay", problems, lambda d: 0 < d <= 1, "a decay in (0, 1] like 0.75")
        return DecayLr(lr, decay) if decay is not None else None
    return ConstantLr(lr)


def _stage(raw: Any, index: int, defaults: dict, problems: list[str]) -> Stage | None:
    where = f"stages[{index}]"
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a mapping like {{name: head, epochs: 3, train: [head]}}")
        return None
    before = len(problems)
    problems.extend(unknown_keys(raw, STAGE_KEYS, where))
    name = raw.get("name", f"stage{index + 1}")
    if not isinstance(name, (str, int)) or isinstance(name, bool) or str(name) == "":
        problems.append(f"{where}.name: expected a name like head, got {name!r}")
    epochs = _whole(raw.get("epochs", 1), f"{where}.epochs", problems, 0, MAX_EPOCHS)
    train = _names(raw.get("train", ["head"]), f"{where}.train", problems, "[head, layer4]")
    if train == ():
        problems.append(f"{where}.train: expected at least one selector, like [head]")
    batchnorm = raw.get("batchnorm", defaults.get("batchnorm", "frozen"))
    if batchnorm not in BATCHNORM_POLICIES:
        problems.append(_batchnorm_problem(f"{where}.batchnorm", batchnorm))
    weight_decay = defaults["weight_decay"]
    if "weight_decay" in raw:
        weight_decay = _weight_decay(raw["weight_decay"], f"{where}.weight_decay", problems)
    rule = _lr_rule(raw, where, problems)
    if len(problems) > before:
        return None
    return Stage(str(name), epochs, train, rule, weight_decay, batchnorm)  # type: ignore[arg-type]


def _plan_defaults(raw: dict, problems: list[str]) -> dict:
    """The plan-level weight_decay and batchnorm, checked once here rather than in every stage."""
    defaults = {"weight_decay": 0.01}
    if "weight_decay" in raw:
        value = _weight_decay(raw["weight_decay"], "weight_decay", problems)
        defaults["weight_decay"] = 0.0 if value is None else value  # a stand-in: the plan is refused anyway
    if "batchnorm" in raw:
        if raw["batchnorm"] in BATCHNORM_POLICIES:
            defaults["batchnorm"] = raw["batchnorm"]
        else:
            problems.append(_batchnorm_problem("batchnorm", raw["batchnorm"]))
    return defaults


def _batchnorm_problem(where: str, value: object) -> str:
    # YAML 1.1 reads an unquoted off, no or false as False (on, yes, true as True): the user wrote a word, not a flag
    word = " (YAML reads an unquoted off, no or false as false, and on, yes or true as true)" if isinstance(value, bool) else ""
    return f"{where}: expected one of {', '.join(BATCHNORM_POLICIES)}, got {value!r}{word}"


def plan_from_dict(raw: Any, source: str = "plan", top_keys: tuple[str, ...] = PLAN_KEYS) -> Plan:
    """The plan in `raw`; every problem at once, in one line that starts with `source` (`top_keys`: the keys
    allowed at the top, which a plan file extends by `training`)."""
    if not isinstance(raw, dict):
        raise ThawError(f"{source}: expected a mapping with a 'stages' list, e.g. {EXAMPLE}")
    problems = unknown_keys(raw, top_keys, "")
    if not isinstance(raw.get("stages"), list) or not raw["stages"]:
        problems.append(f"expected a non-empty 'stages' list, e.g. {EXAMPLE}")
        raise ThawError(f"{source}: " + join_problems(problems))
    defaults = _plan_defaults(raw, problems)
    stages = [_stage(item, i, defaults, problems) for i, item in enumerate(raw["stages"])]
    lora = _lora(raw["lora"], problems) if raw.get("lora") is not None else None
    if problems:
        raise ThawError(f"{source}: " + join_problems(problems))
    try:
        return Plan(tuple(s for s in stages if s is not None), lora)
    except ThawError as error:  # what holds the stages together (names, epochs): said with the file's name too
        raise ThawError(f"{source}: {error}") from None


def _lora(raw: Any, problems: list[str]) -> LoraSpec | None:
    if not isinstance(raw, dict):
        problems.append("lora: expected a mapping like {rank: 8, alpha: 16, targets: [layer4]}")
        return None
    before = len(problems)
    problems.extend(unknown_keys(raw, LORA_KEYS, "lora"))
    rank = _whole(raw.get("rank", 8), "lora.rank", problems, 1, MAX_LORA_RANK)
    alpha = _in_range(raw.get("alpha", 16.0), "lora.alpha", problems, lambda a: a > 0, "a scaling > 0 like 16")
    dropout = _in_range(raw.get("dropout", 0.0), "lora.dropout", problems, lambda d: 0 <= d < 1, "a dropout in [0, 1)")
    targets = _names(raw.get("targets", []), "lora.targets", problems, "[layer4]")
    if len(problems) > before:
        return None
    return LoraSpec(rank, alpha, dropout, targets)  # type: ignore[arg-type]


class RepeatedKey(yaml.YAMLError):
    """A key written twice in one mapping of a plan file, with the lines of both."""

    def __init__(self, key: object, first: int, second: int) -> None:
        where = f"line {first}" if first == second else f"lines {first} and {second}"
        super().__init__(f"{key!r} is written twice ({where})")


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key written twice in one mapping is an error: PyYAML keeps the last without a
    word, so a second `stages:` would replace the first plan unseen."""

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        # Each mapping's own keys, once, before PyYAML folds `<<:` merges into it (in place: a merged-in anchor may be
        # seen again, flattened, holding its merged keys beside its own overrides, which is YAML's way to override).
        checked = self.__dict__.setdefault("_checked_nodes", set())
        if id(node) not in checked:
            checked.add(id(node))
            lines: dict[object, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
                try:
                    if key in lines:
                        raise RepeatedKey(key, lines[key], line)
                    lines[key] = line
                except TypeError:  # a key YAML allows and Python cannot hash: the loader says so
                    continue
        super().flatten_mapping(node)


# YAML 1.1 reads 1:30 as the base-60 number 90: `budget: 1:30` meant as an hour and a half planned 90 seconds. Such a
# value stays the text it is, so the key's own check refuses it.
SEXAGESIMAL = re.compile(r"^[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?$")
UniqueKeyLoader.yaml_implicit_resolvers = {first: list(rules) for first, rules in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _first in "+-0123456789":
    UniqueKeyLoader.yaml_implicit_resolvers.setdefault(_first, []).insert(0, ("tag:yaml.org,2002:str", SEXAGESIMAL))


def load_plan(path: str | Path) -> Plan:
    """The plan in a YAML file; its `training:` options, if any, come from read_plan_file (a warning says so: passed
    as the plan alone, a file's label_smoothing or ema would silently be the defaults)."""
    plan, options = read_plan_file(path)
    if options:
        warnings.warn(
            f"{path} has training: options ({', '.join(options)}), which a plan does not carry: pass them as "
            "TrainConfig(**options), with plan, options = thaw.plan.config.read_plan_file(path)",
            stacklevel=2,
        )
    return plan


def read_plan_file(path: str | Path) -> tuple[Plan, dict[str, Any]]:
    """The plan in a YAML file and its `training:` options (TRAINING_KEYS)."""
    if not isinstance(path, (str, os.PathLike)):  # None was pathlib's TypeError
        raise ThawError(f"a plan file is a path to a YAML file, got {path!r}")
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)
    except RepeatedKey as error:
        raise ThawError(f"{path}: {error}; YAML would keep only the last: keep one") from None
    except OSError as error:
        raise ThawError(f"cannot read plan file {path}: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise ThawError(f"{path} is not UTF-8 text (byte {error.start}); save the plan as UTF-8 YAML") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        if isinstance(error, yaml.constructor.ConstructorError):  # !!python/object and the like: valid YAML, but no plain value
            tag = "could not determine a constructor" in (error.problem or "")
            what = "a YAML tag thaw does not read" if tag else f"what no plan holds ({error.problem})"
            raise ThawError(f"{path}{where} holds {what}; a plan holds plain values: remove it") from None
        raise ThawError(f"{path} is not valid YAML{where}; check indentation and colons") from None
    except (ValueError, TypeError) as error:  # `!!float abc`: a tag's own conversion fails
        raise ThawError(f"{path} holds a value its YAML tag cannot make ({error}); remove the tag or fix the value") from None
    except RecursionError:  # PyYAML composes nested lists and mappings recursively
        raise ThawError(f"{path} nests lists or mappings hundreds deep, which is no plan; see the README's plan file example") from None
    training = raw.pop("training", None) if isinstance(raw, dict) else None
    problems: list[str] = []  # the training keys' problems, reported with the plan's
    if training is not None and not isinstance(training, dict):
        problems.append("training: expected a mapping like {label_smoothing: 0.1, ema: true}")
    elif training is not None:
        problems = unknown_keys(training, TRAINING_KEYS, "training")
    try:
        plan = plan_from_dict(raw, str(path), (*PLAN_KEYS, "training"))
    except ThawError as error:
        if problems:
            raise ThawError(f"{error}; and {join_problems(problems)}") from None
        raise
    if problems:
        raise ThawError(f"{path}: " + join_problems(problems))
    try:
        check_stage_names(plan)
    except ThawError as error:
        raise ThawError(f"{path}: {error}") from None
    return plan, {key: _number_written(value, TRAINING_NUMBERS.get(key)) for key, value in (training or {}).items()}


def _number_written(value: Any, kind: type | None) -> Any:
    """A number the file wrote as text (`"0.1"`; YAML reads `1e-1`, without a dot, as text too) as that number, as
    the plan's lrs are read; anything else as it is, for the options' check to name."""
    if not isinstance(value, str) or kind is None:
        return value
    return _whole_written(value) if kind is int else _decimal_written(value)


WHOLE = r"\s*\+?[0-9]{1,18}\s*"  # ASCII digits, as YAML writes them; past 18 digits no count is meant (and int() refuses 4,300)


def _decimal_written(value: Any) -> Any:
    """A number written as text (`"0.1"`, `1e-3`) as that number; anything else as it is."""
    return float(value) if isinstance(value, str) and is_decimal(value) else value


def _whole_written(value: Any) -> Any:
    """A whole number written as text (`"3"`) as that number; anything else as it is."""
    return int(value) if isinstance(value, str) and re.fullmatch(WHOLE, value, re.ASCII) else value


def _lr_to_dict(rule: LrRule) -> dict[str, Any]:
    match rule:
        case ConstantLr(lr):
            return {"lr": lr}
        case RangeLr(low, high):
            return {"lr_range": [low, high]}
        case DecayLr(head_lr, decay):
            return {"lr": head_lr, "layer_decay": decay}
        case ExplicitLr(by_name):
            return {"lrs": dict(by_name)}
    raise TypeError(rule)


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """The YAML form of a plan: plan_from_dict(plan_to_dict(p)) == p."""
    stages = []
    for stage in plan.stages:
        entry = {"name": stage.name, "epochs": stage.epochs, "train": list(stage.train)}
        entry |= _lr_to_dict(stage.lr) | {"weight_decay": stage.weight_decay, "batchnorm": stage.batchnorm}
        stages.append(entry)
    if plan.lora is None:
        return {"stages": stages}
    lora = plan.lora
    return {"stages": stages, "lora": {"rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout, "targets": list(lora.targets)}}
