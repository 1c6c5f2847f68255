"""Reading a run folder back: its metadata, the fine-tuned model, a LoRA adapter on a base model.

thaw.train.run_folder writes the folder and declares its file names.
"""

from __future__ import annotations

import json
import os
import shlex
from collections import Counter
from collections.abc import Sequence
from dataclasses import fields
from itertools import zip_longest
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from safetensors import safe_open

from thaw._device import check_device, resolve_device
from thaw.data.text import TextColumns
from thaw.errors import ThawError, first_line
from thaw.models import ModelAdapter, Preprocessing, adapt, build_model
from thaw.models.adapter import INTERPOLATIONS, check_float32
from thaw.models.hf_text import POOLINGS, TextPreprocessing, build_text_model
from thaw.models.lora import adapter_param_names, add_lora
from thaw.models.weights import load_into
from thaw.plan.config import plan_from_dict
from thaw.plan.lora_targets import lora_targets
from thaw.train import MODEL_OBJECT, check_model_object, saved_settings
from thaw.train.checkpoint import CHECKPOINT, CLASSES_KEY
from thaw.train.run_folder import ADAPTER, METADATA, SET_ASIDE, TEXT_MODEL, WEIGHTS, read_run_json

__all__ = ["ADAPTER", "METADATA", "TEXT_MODEL", "WEIGHTS", "load_adapter", "load_run", "read_metadata"]


def recorded_data_path(meta: dict) -> str | None:
    """Where a run recorded its data: `data.path`, or `data_path` in runs made before it."""
    return meta.get("data", {}).get("path") or meta.get("data_path")


def read_metadata(run: Path) -> dict:
    """A run's METADATA, checked: every value that loading, scoring, exporting or reporting the run reads is one
    thaw could have written, else one line naming the key (a hand edit would fail later in a traceback, or answer
    wrong without a word)."""
    path = Path(run) / METADATA
    if not path.is_file():
        raise ThawError(_why_no_metadata(Path(run)))
    meta = read_run_json(path, REQUIRED_METADATA, DAMAGED_REMEDY)
    problems = metadata_problems(meta)
    if problems:
        raise ThawError(f"{path} is damaged ({'; '.join(problems)}); {DAMAGED_REMEDY}")
    return meta


REQUIRED_METADATA = {"model": str, "classes": list, "preprocessing": dict, "plan": dict}  # what loading and reporting a run read
DAMAGED_REMEDY = "retrain or restore it from a copy"
TASKS = ("image", "text")  # an older run has no task: an image run


def metadata_problems(meta: dict) -> list[str]:
    """What is wrong in `meta` beyond read_run_json's top-level types: all of it, so one edit fixes the file."""
    task = meta.get("task", "image")
    if task not in TASKS:
        return [f"task is {_shown(task)}, not one of {', '.join(TASKS)}"]
    checks = TEXT_FIELDS if task == "text" else IMAGE_FIELDS
    problems = _class_problems(meta["classes"])
    problems += _unknown_keys(meta, "preprocessing", TextPreprocessing if task == "text" else Preprocessing)
    problems += _unknown_keys(meta, "columns", TextColumns)
    for key, (fits, wanted, required) in (COMMON_FIELDS | checks).items():  # the task's own check of a key wins
        value = _lookup(meta, key)
        if value is _ABSENT:
            problems += [f"no {key}"] if required else []
        elif not fits(value):
            problems.append(f"{key} is {_shown(value)}, not {wanted}")
    return problems


def _class_problems(classes: list[str]) -> list[str]:
    """Two outputs under one name would be told apart by nobody; a classifier tells at least 2 classes apart."""
    repeated = sorted(name for name, count in Counter(classes).items() if count > 1)  # 50,000 classes: no pass per name
    problems = [f"classes names {', '.join(map(repr, repeated))} more than once"] if repeated else []
    if len(classes) < 2:
        problems.append(f"classes has {len(classes)} name{'' if len(classes) == 1 else 's'}, not at least 2")
    return problems


def _unknown_keys(meta: dict, key: str, kind: type) -> list[str]:
    """Keys of `meta[key]` that its dataclass `kind` (built from them on loading) has no field for."""
    known = {field.name for field in fields(kind)}
    found = meta.get(key)
    unknown = sorted(str(name) for name in found if name not in known) if isinstance(found, dict) else []
    return [f"{key} has unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}"] if unknown else []


_ABSENT = object()


def _lookup(meta: dict, dotted: str) -> object:
    """meta["a"]["b"] for "a.b"; _ABSENT where a key is missing, or a parent is not a mapping (reported on its own)."""
    value: object = meta
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            return _ABSENT
        value = value[key]
    return value


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_positive_whole(value: object) -> bool:
    return _is_whole(value) and value > 0  # type: ignore[operator]


def _is_text_or_null(value: object) -> bool:
    return value is None or isinstance(value, str)


def _channel_values(value: object) -> bool:
    """One number per colour channel, or one for all three (torchvision's Normalize takes either; images load as RGB)."""
    return isinstance(value, list) and len(value) in (1, 3) and all(_is_number(item) for item in value)


def _divisors(value: object) -> bool:
    return _channel_values(value) and all(item > 0 for item in value)  # type: ignore[union-attr]


def _column(value: object) -> bool:
    return _is_text_or_null(value) or _is_whole(value)


def _skipped_files(value: object) -> bool:
    return isinstance(value, list) and all(
        isinstance(item, dict) and isinstance(item.get("path"), str) and isinstance(item.get("reason"), str) for item in value
    )


Check = tuple[Callable[[object], bool], str, bool]  # test, what the value must be, whether every run thaw wrote has it
# Preprocessing and TextPreprocessing as asdict writes them (every thaw version, all fields; `source` only describes)
IMAGE_FIELDS: dict[str, Check] = {
    "preprocessing.mean": (_channel_values, "1 or 3 numbers (one per colour channel)", True),
    "preprocessing.std": (_divisors, "1 or 3 numbers above 0 (inputs are divided by them)", True),
    "preprocessing.resize_size": (_is_positive_whole, "a whole number of pixels above 0", True),
    "preprocessing.crop_size": (_is_positive_whole, "a whole number of pixels above 0", True),
    "preprocessing.interpolation": (lambda value: value in INTERPOLATIONS, f"one of {', '.join(INTERPOLATIONS)}", True),
    "preprocessing.source": (lambda value: isinstance(value, str), "a text", False),
}
TEXT_FIELDS: dict[str, Check] = {
    "preprocessing.tokenizer": (lambda value: isinstance(value, str), "a folder or model id", True),
    "preprocessing.max_length": (_is_positive_whole, "a whole number of tokens above 0", True),
    "preprocessing.pooling": (lambda value: value in POOLINGS, f"one of {', '.join(POOLINGS)}", True),
    "preprocessing.source": (lambda value: isinstance(value, str), "a text", False),
    "val_split": (_is_number, "a share like 0.1", True),  # scoring a split of a text table reads it
    "columns.text": (_column, "a column name, position or null", False),
    "columns.label": (_column, "a column name, position or null", False),
    "columns.delimiter": (_is_text_or_null, "a delimiter or null", False),
    "copies_together": (lambda value: isinstance(value, bool), "true or false", False),  # scoring a split reads it
    # this too; a name this thaw does not know (a newer thaw's) is said where a split is scored, not here, where it
    # would refuse predict and export too, which never split the table
    "split_rule": (lambda value: isinstance(value, str), "a split rule's name", False),
}
# What scoring and reporting a run read where present (older runs lack some); a parent that is not a mapping is
# reported, and its keys are not looked for
COMMON_FIELDS: dict[str, Check] = {
    "weights": (_is_text_or_null, "a weights name, a path or null", False),
    "data_path": (_is_text_or_null, "a path", False),
    "data": (lambda value: isinstance(value, dict), "a mapping", False),
    "data.path": (_is_text_or_null, "a path", False),
    "data.samples": (_is_text_or_null, "a digest", False),  # null: not compared
    "val_split": (_is_number, "a share like 0.2", False),
    "test_split": (_is_number, "a share like 0.1", False),
    "train_config": (lambda value: isinstance(value, dict), "a mapping", False),
    "train_config.seed": (_is_whole, "a whole number", False),
    "columns": (lambda value: isinstance(value, dict), "a mapping", False),
    "skipped_files": (_skipped_files, "a list of {path, reason} records", False),
}


def _why_no_metadata(run: Path) -> str:
    """A folder without METADATA: a run stopped before its end (Ctrl-C, a crash) is still a run, and says how to finish."""
    if (run / CHECKPOINT).is_file():
        settings = saved_settings(run) or {}
        finish = f"resume_run({str(run)!r}, model=...) in Python" if settings.get("model_source") == MODEL_OBJECT else f"thaw train --resume {shlex.quote(str(run))}"
        return f"{run} is an unfinished run (a checkpoint, no {METADATA} yet): finish it with {finish}"
    if (run / SET_ASIDE / METADATA).is_file():  # a replacement (--overwrite) killed before its first checkpoint
        return f"{run} holds its finished run set aside in {run / SET_ASIDE}: move the files there back into {run}"
    if not run.exists():
        return f"{run} does not exist; pass the --out folder of thaw train"
    if run.is_file() and (run.parent / METADATA).is_file():  # RUN/thaw.json or RUN/model.safetensors, say
        return f"{run} is a file of the run in {run.parent}; pass the folder, {run.parent}"
    return f"{run} is not a thaw run folder (no {METADATA}); pass the --out folder of thaw train"


def load_run(run: str | Path, device: str | torch.device = "cpu", model: nn.Module | ModelAdapter | None = None) -> tuple[ModelAdapter, dict]:
    """The fine-tuned model of a run, ready for inference, and its metadata.

    `model`: for a run trained on a model object, the same architecture (a new instance; the run's weights are loaded
    into it); for a run trained on a named model it may stand in for the name."""
    if not isinstance(run, (str, os.PathLike)) or not str(run).strip():  # pathlib's TypeError named no argument
        raise ThawError(f"run must be a run folder's path (a str or pathlib.Path), got {run!r}")
    if model is not None and not isinstance(model, (nn.Module, ModelAdapter)):  # a name: the run records its own
        raise ThawError(f"model must be an nn.Module or a ModelAdapter of the run's architecture (or left out), got {model!r}")
    check_device(str(device))  # one line for a device this machine lacks, not torch's error from the first .to()
    device = resolve_device(str(device))
    run = Path(run)
    meta = read_metadata(run)
    weights_path = check_delivered_weights(run)
    if meta.get("task") == "text":
        adapter = _text_adapter(run, meta)
    else:
        adapter = _image_model(run, meta, model)
        adapter.preprocessing = Preprocessing(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["preprocessing"].items()})
    if (meta.get("plan") or {}).get("lora"):  # the same LoRA layers as in training, so the weights fit
        spec = plan_from_dict(meta["plan"], f"{run}/{METADATA} plan").lora
        add_lora(adapter, spec, lora_targets(adapter, spec))
    state, header = _read_weights(weights_path)
    check_head_fits_classes(run, adapter, state, meta["classes"])
    check_weights_trained_on_classes(run, weights_path, header.get(CLASSES_KEY), meta["classes"])
    load_into(adapter.model, state, str(weights_path))
    adapter.model.to(device).eval()
    return adapter, meta


def check_delivered_weights(run: Path) -> Path:
    """The weights file a finished run delivered, there and readable as safetensors (its header: no tensor is read)."""
    weights_path = run / WEIGHTS
    if not weights_path.is_file():
        # METADATA is written after the weights, at a run's end: the file was moved or deleted since
        raise ThawError(f"{run} has no {WEIGHTS}, though its {METADATA} says the run finished; retrain or restore it from a copy")
    try:
        with safe_open(str(weights_path), framework="pt"):
            pass
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error type for a cut or foreign file
        raise _damaged(weights_path, error) from None
    return weights_path


def _damaged(path: Path, error: Exception) -> ThawError:
    """safetensors' error for a file it could not read, as a refusal; but a file thaw may not read raises Python's own
    PermissionError (one line in the CLI: check its permissions), where safetensors says 'No such file'."""
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise
    except OSError:  # gone since, say: the refusal below names the path
        pass
    return ThawError(f"{path} is damaged ({first_line(error)}); retrain or restore it from a copy")


def check_head_fits_classes(run: Path, adapter: ModelAdapter, state: dict[str, torch.Tensor], classes: list[str]) -> None:
    """One saved head output per class name: a name added to METADATA or dropped from it would otherwise surface
    as weights that do not fit the architecture, and the advice to check --model."""
    head = state.get(f"{adapter.head_name}.weight")
    if head is not None and head.shape[0] != len(classes):
        raise ThawError(
            f"{run / METADATA} is damaged (classes has {len(classes)} names, the head in {WEIGHTS} has {head.shape[0]} outputs); "
            f"{DAMAGED_REMEDY}"
        )


def check_weights_trained_on_classes(run: Path, weights_path: Path, recorded: str | None, classes: list[str]) -> None:
    """The class names thaw.json gives the head's outputs are those the weights were trained on, in the same order:
    classes reordered or renamed by hand, or weights copied in from another run, would label every prediction wrongly
    without a word. A rename cannot be told from weights of another run, so it is refused too. Weights saved before
    thaw recorded their classes (`recorded`, the header entry, None) are not checked."""
    trained = _recorded_classes(weights_path, recorded)
    index = None if trained is None else _first_difference(classes, trained)
    if index is not None:
        raise ThawError(
            f"{run / METADATA} and {WEIGHTS} disagree: class {index} is {_name_at(classes, index)} in {METADATA} and "
            f"{_name_at(trained, index)} in {WEIGHTS}, which records the classes it was trained on (classes were edited, or "
            f"one file was copied from another run); restore both files from the same run, or retrain"
        )


def _recorded_classes(path: Path, recorded: str | None) -> list[str] | None:
    """The class names a weights file's header records (`recorded`, its CLASSES_KEY entry), or None where it has none."""
    if recorded is None:
        return None
    try:
        trained = json.loads(recorded)
    except (ValueError, RecursionError):  # a header made by hand: nested past Python's stack, say
        trained = None
    if not (isinstance(trained, list) and all(isinstance(name, str) for name in trained)):
        raise ThawError(f"{path} is damaged (its header's {CLASSES_KEY} is not a list of class names); {DAMAGED_REMEDY}")
    repeated = sorted(name for name, count in Counter(trained).items() if count > 1)  # thaw records each class once
    if repeated:
        raise ThawError(f"{path} is damaged (its header's {CLASSES_KEY} names {', '.join(map(repr, repeated))} more than once); {DAMAGED_REMEDY}")
    return trained


def _first_difference(given: Sequence[str], trained: Sequence[str]) -> int | None:
    """The first position where two class lists differ (a name, or one list ending before the other)."""
    return next((index for index, pair in enumerate(zip_longest(given, trained)) if pair[0] != pair[1]), None)


def _name_at(names: Sequence[str], index: int) -> str:
    return repr(names[index]) if index < len(names) else "no name"


def _image_model(run: Path, meta: dict, model: nn.Module | ModelAdapter | None) -> ModelAdapter:
    """The run's architecture with a head per class, its weights not loaded yet."""
    classes = len(meta["classes"])
    check_model_object(run, meta, model, "load_run")
    if model is None:
        return build_model(meta["model"], weights=meta.get("weights"), num_classes=classes, load=False)
    check_float32(model.model if isinstance(model, ModelAdapter) else model)
    adapter = model if isinstance(model, ModelAdapter) else adapt(model, num_classes=classes)
    if adapter.num_classes != classes:
        raise ThawError(f"the model given has {adapter.num_classes} outputs and the run {classes} classes; pass the run's architecture")
    return adapter


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the header's metadata, in one opening of the file."""
    try:
        with safe_open(str(path), framework="pt") as opened:
            return {name: opened.get_tensor(name) for name in opened.keys()}, opened.metadata() or {}
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error type for a cut or foreign file
        raise _damaged(path, error) from None


def load_adapter(adapter: ModelAdapter, path: str | Path, classes: Sequence[str] | None = None) -> list[str] | None:
    """Put a saved adapter onto a base model that already has the same LoRA layers. Returns the class names it was
    trained on, in head order (None for an adapter saved before thaw recorded them). `classes`, where given, must be
    those names in that order: an adapter from a run on other classes would label every output wrongly."""
    if not isinstance(adapter, ModelAdapter):
        raise ThawError("load_adapter takes the base model as a ModelAdapter (build_model or adapt) with add_lora applied")
    if classes is not None and (isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence)):
        # a str is a Sequence of one-letter names ("abc" would pass for ["a", "b", "c"]); a set has no order to check
        raise ThawError(f"classes must be a list of class names in head order, got {type(classes).__name__} {classes!r}")
    if not isinstance(path, (str, os.PathLike)):
        raise ThawError(f"load_adapter takes the path of an {ADAPTER} file, got {type(path).__name__} {path!r}")
    path = Path(path)
    if not path.is_file():
        raise ThawError(f"no adapter file at {path}; pass the {ADAPTER} a LoRA run wrote")
    state, header = _read_weights(path)
    trained = _recorded_classes(path, header.get(CLASSES_KEY))
    _check_adapter_fits(adapter, path, state, trained)
    index = None if classes is None or trained is None else _first_difference(list(classes), trained)
    if index is not None:
        raise ThawError(
            f"{path} was trained on other classes: class {index} is {_name_at(list(classes), index)} in the classes given "
            f"and {_name_at(trained, index)} in the adapter; pass the classes of the run that wrote it, in its order "
            f"({METADATA} there lists them), or train on yours"
        )
    adapter.model.load_state_dict(state, strict=False)
    return trained


def _check_adapter_fits(adapter: ModelAdapter, path: Path, state: dict[str, torch.Tensor], trained: list[str] | None) -> None:
    """The adapter file fits the model: nothing the model lacks, every tensor of the right shape, and the adapter
    weights and head it always holds all there (loaded without them, the model would keep random ones)."""
    model_state = adapter.model.state_dict()
    unknown = sorted(set(state) - set(model_state))
    if unknown:
        raise ThawError(
            f"{path} holds tensors this model lacks ({', '.join(unknown[:3])}); build the same model with the same LoRA options"
        )
    head = f"{adapter.head_name}.weight"
    outputs = state[head].shape[0] if head in state and state[head].dim() else None  # 0-d: the shape check says so
    if trained is not None and outputs is not None and len(trained) != outputs:
        raise ThawError(f"{path} is damaged (its header names {len(trained)} classes, its head has {outputs} outputs); {DAMAGED_REMEDY}")
    if outputs is not None and outputs != model_state[head].shape[0]:
        raise ThawError(
            f"{path} was trained on {outputs} classes and this model's head has {model_state[head].shape[0]} outputs; "
            f"build the model with num_classes={outputs}"
        )
    misfit = next((name for name in state if state[name].shape != model_state[name].shape), None)
    if misfit is not None:  # another LoRA rank, say: torch's error would run to many lines
        raise ThawError(
            f"{path} holds {misfit} of shape {tuple(state[misfit].shape)}, this model's is {tuple(model_state[misfit].shape)}; "
            f"build the same model with the same LoRA options"
        )
    head_params = sorted(name for name in adapter.group("head").params if name not in state)
    if head_params:
        raise ThawError(f"{path} lacks the head ({', '.join(head_params)}), which an adapter file always holds; {DAMAGED_REMEDY}")
    lora_params = [name for name in adapter_param_names(adapter.model) if name not in state]
    if lora_params:  # a model given more targets than the run's, most likely; or a damaged file
        raise ThawError(
            f"{path} lacks adapter weights this model has ({', '.join(sorted(lora_params)[:3])}, {len(lora_params)} in all); build "
            f"the model with the LoRA options of the run that wrote it (its targets), or restore the file from a copy"
        )


def _text_adapter(run: Path, meta: dict) -> ModelAdapter:
    folder = run / TEXT_MODEL
    if not (folder / "config.json").is_file():
        raise ThawError(f"{run} has no {TEXT_MODEL}/config.json; the text run did not finish, or the folder was copied in part")
    pre = meta["preprocessing"]
    adapter = build_text_model(
        str(folder), num_classes=len(meta["classes"]), pooling=pre["pooling"], max_length=pre["max_length"], load=False
    )
    adapter.preprocessing = TextPreprocessing(**pre)
    return adapter
