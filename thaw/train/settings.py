"""What decides a run's result, recorded in its checkpoint so that a resume continues the same run.

A resume with another batch size, seed, image size, schedule or data would mix two runs (a
mid-epoch batch offset reused with a new batch size, say), so every such difference is refused.
Settings that change how a run goes but not what it computes (workers, device, printing, memory
budgets) may differ.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import Callable

from thaw.data.folders import LabelledData
from thaw.errors import ThawError
from thaw.train.config import SWITCHES, TrainConfig

# How a run computes, not what: free to differ on --resume (like the device, --compile changes the floating-point
# rounding of the steps after it, not the recipe).
RUNTIME_FIELDS = frozenset({"workers", "device", "quiet", "strict", "cache_memory_gb", "decoded_memory_gb", "compile"})
META_KEYS = (
    "task", "model", "model_source", "model_groups", "weights", "val_split", "test_split", "columns", "pooling", "max_length",
    "copies_together", "split_rule",  # copies_together: recorded by runs made before split_rule
)


def source_name(value: str | None) -> str | None:
    """A weights or model source as a run records it: a local path resolved (so a resume from
    another folder names the same file), `none` as None, a registry name as given."""
    if value is None or str(value).lower() == "none":
        return None
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else str(value)


def samples_digest(data: LabelledData) -> str:
    """The samples training reads (train and val): image files by their path inside the data folder
    and size, texts by content. A moved folder keeps its digest; an added, removed, relabelled or
    rewritten file changes it. The test split is left out: training never reads it."""
    digest = hashlib.sha256()
    splits = {"train": data.train, "val": data.val}
    paths = [item for samples in splits.values() for item, _ in samples if isinstance(item, Path)]
    root = os.path.commonpath([os.path.abspath(p) for p in paths]) if paths else ""
    for name, samples in splits.items():
        digest.update(f"[{name}]".encode())
        for item, label in samples:
            if isinstance(item, Path):
                entry = f"{os.path.relpath(os.path.abspath(item), root)}|{item.stat().st_size}|{label}"
            else:
                entry = f"{len(item)}|{item}|{label}"
            digest.update(entry.encode("utf-8", "surrogateescape") + b"\n")  # a name that is not UTF-8 (an old zip): its bytes
    return digest.hexdigest()[:20]


def split_as_recorded(split_by: Callable[[str], LabelledData], rules: tuple[str, ...], digest: str | None) -> tuple[LabelledData, str]:
    """The data split by the rule a run was made with, and that rule. Where its record leaves several (a run that said
    `copies_together`: three versions of thaw wrote it, each splitting its own way), the one whose train and val
    samples have the digest it recorded. Where none has (the data changed), the first: the run's own check of its
    samples then refuses it, saying the data changed. A rule that cannot split the data is passed over while
    another is left."""
    if len(rules) > 1 and not digest:  # a hand-edited record: guessing would score a split holding trained samples
        raise ThawError(
            "the run records copies_together, which three versions of thaw wrote, each splitting its own way, but no "
            "digest of its samples to tell which: its split cannot be rebuilt; pass held-out data as DATA, scored whole (no --split)"
        )
    found: list[tuple[LabelledData, str]] = []
    problem: ThawError | None = None
    for rule in rules:
        try:
            data = split_by(rule)
        except ThawError as error:
            problem = problem or error
            continue
        if len(rules) == 1 or samples_digest(data) == digest:
            return data, rule
        found.append((data, rule))
    if not found:
        raise problem  # every rule refused the data: the first refusal says why
    return found[0]


def training_config(config: TrainConfig, bf16: bool) -> dict:
    """The fields of a TrainConfig that decide the result, with the precision `auto` resolved to:
    the same run resumed on a machine with other bf16 support must compute the same way."""
    chosen = {key: value for key, value in asdict(config).items() if key not in RUNTIME_FIELDS}
    return chosen | {"precision": "bf16" if bf16 else "fp32"}


def run_settings(config: TrainConfig, data: LabelledData, meta: dict, plan: dict, *, bf16: bool, processes: int) -> dict:
    """Everything a resume must match: how it trains, what it trains, on which samples, in how many processes."""
    return {
        "config": training_config(config, bf16),
        "plan": plan,
        "classes": list(data.classes),
        "samples": samples_digest(data),
        "processes": processes,  # the global batch, the steps per epoch and each rank's shard depend on it
        **{key: meta[key] for key in META_KEYS if key in meta},
    }


def differences(saved: dict, now: dict) -> list[str]:
    """Each setting both record that differs, as 'name (the run: X, now: Y)'. A setting only one side
    records (a field a later thaw added, a text option of an image run) does not count."""
    found = []
    for key in sorted(set(saved) & set(now)):
        if key == "config":  # a field the run predates counts as the value it ran with
            found += differences({k: v for k, v in ADDED_LATER.items() if k in now[key]} | saved[key], now[key])
        elif saved[key] != now[key]:
            found.append(_describe(key, saved[key], now[key]))
    return found


DATA_CHANGED = "the data: its files, sizes or labels changed"


def _describe(key: str, then: object, now: object) -> str:
    if key == "samples":
        return DATA_CHANGED
    if key == "plan":
        return _plan_difference(then, now)
    if key == "classes":
        return f"the classes ({class_change(then, now)})"  # type: ignore[arg-type]
    return f"{key.replace('_', '-')} (the run: {_shown(key, then)}, now: {_shown(key, now)})"


def class_change(then: list[str], now: list[str]) -> str:
    """What sets two class lists apart, by name: a label renamed in the data reads as one gone and one new."""
    gone, new = [name for name in then if name not in now], [name for name in now if name not in then]
    if not gone and not new:
        return "the same classes in another order"
    return ", ".join(f"{_few(names)} {'is' if len(names) == 1 else 'are'} {what}" for names, what in ((gone, "gone"), (new, "new")) if names)


def _few(names: list[str]) -> str:
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return ", ".join(repr(name) for name in names[:3]) + more


def _shown(key: str, value: object) -> str:
    """A setting as a user types it: a budget in seconds (30s, not 30.0), none where unset (not Python's None)."""
    if value is None:
        return "none"
    if key == "budget" and isinstance(value, (int, float)):
        return f"{int(value)}s" if float(value).is_integer() else f"{value}s"  # 1000000s, as parse_budget reads it back
    return repr(value)


def _plan_difference(then: object, now: object) -> str:
    """What differs between two recorded plans, as a user typed it: `--epochs 5` said only 'the plan'."""
    try:
        before, after = then["stages"], now["stages"]  # type: ignore[index]
        names = [stage["name"] for stage in before], [stage["name"] for stage in after]
        if names[0] != names[1]:
            return f"the plan's stages (the run: {names[0]}, now: {names[1]})"
        changed = sorted({key for old, new in zip(before, after) for key in set(old) | set(new) if old.get(key) != new.get(key)})
        if changed == ["epochs"]:
            epochs = [stage["epochs"] for stage in before], [stage["epochs"] for stage in after]
            return f"the plan's epochs per stage {names[0]} (the run: {epochs[0]}, now: {epochs[1]})"
        return f"the plan ({', '.join(changed) or 'its options'} of its stages)"
    except (KeyError, TypeError, AttributeError):  # a record of another shape: say no more than that
        return "the plan"


# Fields a later thaw added, with the value that reproduces a run recorded before them (a run resumed with
# the newer default would change halfway: the weight average did not exist when such a run started).
ADDED_LATER = {
    "ema": False, "budget": None, "label_smoothing": 0.0, "progressive_resize": None, "auto_augment": None, "mixup": 0.0, "cutmix": 0.0,
    "cache_prefix": False,
}


def config_from_settings(settings: dict, **runtime: object) -> TrainConfig:
    """The run's own TrainConfig, with runtime fields (workers, device, quiet, ...) as given."""
    known = {f.name for f in fields(TrainConfig)}
    saved = {k: v for k, v in settings["config"].items() if k in known}
    # A thaw before the switches were checked recorded what it was given (augment=1, strict=0) and trained by its truth:
    # rebuilt as it trained, so such a run still resumes.
    saved |= {k: bool(saved[k]) for k in SWITCHES if k in saved and saved[k] is not None}
    return TrainConfig(**{k: v for k, v in ADDED_LATER.items() if k not in saved} | saved, **runtime)
