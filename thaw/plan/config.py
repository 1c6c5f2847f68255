"""Plans from YAML. Every problem in the file is reported at once, with the nearest valid key."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml

from thaw.errors import ThawError, join_problems
from thaw.plan.freeze import BATCHNORM_POLICIES
from thaw.plan.lr import ConstantLr, DecayLr, ExplicitLr, LrRule, RangeLr
from thaw.models.lora import LoraSpec
from thaw.plan.stages import Plan, Stage

PLAN_KEYS = ("stages", "weight_decay", "batchnorm", "lora")
LORA_KEYS = ("rank", "alpha", "dropout", "targets")
STAGE_KEYS = ("name", "epochs", "train", "lr", "lr_range", "layer_decay", "lrs", "weight_decay", "batchnorm")
EXAMPLE = "stages: [{name: head, epochs: 3, train: [head], lr: 1.0e-3}]"


def _unknown_keys(mapping: dict, allowed: tuple[str, ...], where: str) -> list[str]:
    problems = []
    for key in mapping:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (valid: {', '.join(allowed)})"
            problems.append(f"{where}: unknown key {key!r}{hint}")
    return problems


def _number(value: Any, where: str, problems: list[str]) -> float | None:
    # YAML reads 1e-3 (no dot) as a string; accept it as the number users meant.
    try:
        return float(value)
    except (TypeError, ValueError):
        problems.append(f"{where}: expected a number, got {value!r}")
        return None


def _lr_rule(raw: dict, where: str, problems: list[str]) -> LrRule | None:
    given = [k for k in ("lr_range", "lrs") if k in raw] + (["layer_decay"] if "layer_decay" in raw else [])
    if len(given) > 1:
        problems.append(f"{where}: give only one of lr_range, layer_decay, lrs")
        return None
    if "lrs" in raw:
        if not isinstance(raw["lrs"], dict) or not raw["lrs"]:
            problems.append(f"{where}.lrs: expected a mapping of group or module names to lrs")
            return None
        values = {str(k): _number(v, f"{where}.lrs.{k}", problems) for k, v in raw["lrs"].items()}
        return ExplicitLr(values) if None not in values.values() else None  # type: ignore[arg-type]
    if "lr_range" in raw:
        pair = raw["lr_range"]
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            problems.append(f"{where}.lr_range: expected [low, high]")
            return None
        low, high = (_number(v, f"{where}.lr_range", problems) for v in pair)
        return RangeLr(low, high) if low is not None and high is not None else None
    lr = _number(raw.get("lr", 1e-3), f"{where}.lr", problems)
    if lr is None:
        return None
    if "layer_decay" in raw:
        decay = _number(raw["layer_decay"], f"{where}.layer_decay", problems)
        return DecayLr(lr, decay) if decay is not None else None
    return ConstantLr(lr)


def _stage(raw: Any, index: int, defaults: dict, problems: list[str]) -> Stage | None:
    where = f"stages[{index}]"
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a mapping like {{name: head, epochs: 3, train: [head]}}")
        return None
    before = len(problems)
    problems.extend(_unknown_keys(raw, STAGE_KEYS, where))
    epochs = raw.get("epochs", 1)
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 0:
        problems.append(f"{where}.epochs: expected a whole number >= 0, got {epochs!r}")
    train = raw.get("train", ["head"])
    train = [train] if isinstance(train, str) else train
    if not isinstance(train, list) or not all(isinstance(t, (str, int)) for t in train) or not train:
        problems.append(f"{where}.train: expected a selector or a list of selectors")
    batchnorm = raw.get("batchnorm", defaults.get("batchnorm", "frozen"))
    if batchnorm not in BATCHNORM_POLICIES:
        problems.append(f"{where}.batchnorm: expected one of {', '.join(BATCHNORM_POLICIES)}, got {batchnorm!r}")
    weight_decay = _number(raw.get("weight_decay", defaults.get("weight_decay", 0.01)), f"{where}.weight_decay", problems)
    rule = _lr_rule(raw, where, problems)
    if len(problems) > before:
        return None
    return Stage(str(raw.get("name", f"stage{index + 1}")), epochs, tuple(str(t) for t in train), rule, weight_decay, batchnorm)


def plan_from_dict(raw: Any, source: str = "plan") -> Plan:
    if not isinstance(raw, dict) or "stages" not in raw:
        raise ThawError(f"{source}: expected a mapping with a 'stages' list, e.g. {EXAMPLE}")
    problems = _unknown_keys(raw, PLAN_KEYS, source)
    if not isinstance(raw["stages"], list) or not raw["stages"]:
        problems.append(f"{source}.stages: expected a non-empty list of stages")
        raise ThawError(join_problems(problems))
    defaults = {k: raw[k] for k in ("weight_decay", "batchnorm") if k in raw}
    stages = [_stage(item, i, defaults, problems) for i, item in enumerate(raw["stages"])]
    lora = _lora(raw["lora"], problems) if raw.get("lora") is not None else None
    if problems:
        raise ThawError(f"{source}: " + join_problems(problems))
    return Plan(tuple(s for s in stages if s is not None), lora)


def _lora(raw: Any, problems: list[str]) -> LoraSpec | None:
    if not isinstance(raw, dict):
        problems.append("lora: expected a mapping like {rank: 8, alpha: 16, targets: [layer4]}")
        return None
    problems.extend(_unknown_keys(raw, LORA_KEYS, "lora"))
    targets = raw.get("targets", [])
    targets = [targets] if isinstance(targets, str) else targets
    try:
        return LoraSpec(int(raw.get("rank", 8)), float(raw.get("alpha", 16.0)), float(raw.get("dropout", 0.0)), tuple(str(t) for t in targets))
    except (TypeError, ValueError, ThawError) as error:
        problems.append(f"lora: {error}")
        return None


def load_plan(path: str | Path) -> Plan:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as error:
        raise ThawError(f"cannot read plan file {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ThawError(f"{path} is not valid YAML{where}; check indentation and colons") from None
    return plan_from_dict(raw, str(path))


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
