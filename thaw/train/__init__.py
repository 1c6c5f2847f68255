"""Training: run a plan on labelled images or text and leave a run folder behind."""

from __future__ import annotations

import inspect
import json
import numbers
import os
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from thaw.data.folders import ImageData, discover, split_folders, would_be_read
from thaw.data.text import SPLIT_RULE, TextColumns, TextData, load_text_data, recorded_split_rules
from thaw.models import ModelAdapter, adapt, build_model
from thaw.models.adapter import check_float32, check_image_preprocessing
from thaw.models.hf_text import DEFAULT_MAX_LENGTH, TextPreprocessing, build_text_model, check_max_length
from thaw.models.sources import hf_source
from thaw.plan import Plan, plan_from_dict, plan_to_dict
from thaw.plan.freeze import release
from thaw.plan.stages import check_stage_names
from thaw.plan.strategies import check_plan_options, default_strategy
from thaw._device import check_device
from thaw.errors import ThawError
from thaw.train import checkpoint
from thaw.train.config import TrainConfig, check_batch_statistics, check_class_scores, check_image_augments, check_plan, check_plan_before_data, check_switch
from thaw.train.settings import RUNTIME_FIELDS, config_from_settings, samples_digest, source_name, split_as_recorded
from thaw import distributed
from thaw.train.fit import EpochCallback, RunResult, RunState, StepHook, effective_preprocessing, fit, signals_held
from thaw.train.run_folder import METADATA, is_finished, preprocessing_dict, save_adapter, save_text_model, write_run

__all__ = ["EpochCallback", "RunResult", "RunState", "TextColumns", "TrainConfig", "resume_run", "train_images", "train_text"]


DEFAULT_IMAGE_VAL_SPLIT = 0.2  # of the training images, held out where the data has no val folder
MODEL_OBJECT = "object"  # metadata "model_source" of a run trained on a model object: no name rebuilds it


def train_images(
    data_path: str | Path,
    *,
    model: str | nn.Module | ModelAdapter,
    out: str | Path,
    weights: str | None = "DEFAULT",
    plan: Plan | str | None = None,
    plan_options: dict | None = None,
    config: TrainConfig = TrainConfig(),
    val_split: float | None = None,
    resume: bool = False,
    overwrite: bool = False,
    callbacks: list[EpochCallback] | None = None,
    step_hooks: list[StepHook] | None = None,
) -> RunResult:
    """Fine-tune `model` on the images at `data_path` by `plan` (a Plan or a strategy name; by default head-top-all).

    `val_split`: the share of the training images held out to pick the best epoch (default 0.2), where the data has
    no val folder; beside one it would do nothing, and is refused.

    `model`: a name (`weights` says which weights), or a model you built, as an nn.Module (thaw.adapt gives it a new
    head for the data's classes) or a ModelAdapter whose head already has one output per class; such a run is read
    back with load_run(out, model=...) and continued with resume_run(out, model=...), given the same architecture.
    `out` must not hold a run already, unless `resume` (continue it) or `overwrite` (replace it)."""
    plan = plan or default_strategy("image")
    given = val_split is not None
    val_split = DEFAULT_IMAGE_VAL_SPLIT if val_split is None else val_split
    _check_call_types({"data_path": data_path, "out": out}, {"val_split": val_split}, callbacks, step_hooks)
    if weights is not None and not isinstance(weights, (str, os.PathLike)):  # a number was a TypeError from pathlib
        raise ThawError(f"weights must be a weights name like 'IMAGENET1K_V1', a file's path, or None, got {weights!r}")
    val_split = float(val_split)  # numpy's float32 is no JSON number: thaw.json could not be written at the run's end
    _check_switches(resume=resume, overwrite=overwrite)
    _check_val_share(val_split, resume)
    # A run that continues passes the share it recorded, which its val folder left unread; a resume with nothing to
    # continue starts a new run, and is checked as one.
    if given and not (resume and _holds_run_to_continue(Path(out))):
        _check_val_split_is_read(val_split, Path(data_path))
    _check_arguments(plan, plan_options, config, resume)
    check_plan_before_data(model, weights, "image", plan, plan_options, not resume)  # a typo in stage 2 stops nothing half-done
    if not (resume and (Path(out) / checkpoint.CHECKPOINT).is_file()):  # a resume without a checkpoint starts the run
        check_out_outside_data(Path(out), Path(data_path))
    data = discover(data_path, val_split=val_split, seed=config.seed)
    torch.manual_seed(config.seed)  # the new head's initial weights are part of the run's seed
    adapter = _image_adapter(model, weights, list(data.classes))
    meta = {
        "format": "thaw-run/1", "task": "image", "model": model_name(model), "weights": source_name(weights) if isinstance(model, str) else None,
        "classes": list(data.classes), "val_split": val_split, "data_path": str(Path(data_path).resolve()),
    } | ({} if isinstance(model, str) else {"model_source": MODEL_OBJECT, "model_groups": model_groups(adapter)})
    return _run(adapter, data, data_path, plan, plan_options, config, Path(out), meta, resume, overwrite, callbacks, step_hooks)


def _trained_on(weights: str | None, classes: list[str]) -> bool:
    """Whether `weights` is a thaw run's weights file, trained on these classes in this order (more data for the same
    classes, say): its head scores them already, so a new run keeps it rather than start a new one. The classes are
    the ones the file's own header records (a copied file keeps them), else those of the run's thaw.json beside it."""
    try:
        path = Path(weights).expanduser() if isinstance(weights, (str, os.PathLike)) else None
    except RuntimeError:  # ~nosuchuser/: no home to expand; the load says the file is missing
        return False
    if path is None or not path.is_file():  # a weights name: no run's
        return False
    recorded = _header_classes(path)
    return (recorded if recorded is not None else _folder_classes(path)) == list(classes)


def _header_classes(path: Path) -> list | None:
    """The class names a thaw run wrote into its model.safetensors header (save_weights); None for any other file."""
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            recorded = json.loads((handle.metadata() or {}).get(checkpoint.CLASSES_KEY, "null"))
    except Exception:  # noqa: BLE001 - a damaged file or header: its load says what is wrong
        return None
    return recorded if isinstance(recorded, list) else None


def _folder_classes(path: Path) -> list | None:
    """The classes of the image run whose thaw.json lies beside `path`; None without one (a downloaded file)."""
    try:
        recorded = json.loads((path.parent / METADATA).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # no run folder, or one whose record is damaged: a new head
        return None
    return recorded.get("classes") if isinstance(recorded, dict) and recorded.get("task") == "image" else None


def check_out_outside_data(out: Path, data_path: Path, flag: str = "--out") -> None:
    """A run folder where discover reads the data would become part of it: its plots read as images of a class (or
    its folder as a class) by the next run on that folder. Refused for a new run (`flag` named the folder)."""
    if would_be_read(data_path, out):
        where = "is the data folder" if out.resolve() == data_path.resolve() else f"is inside the data folder {data_path}"
        # --resume names the run's folder whatever --out says: the way out is another folder for it, or no resume
        fix = "--resume takes the folder a run wrote; drop it to start a run in --out" if flag == "--resume" else "put the run folder elsewhere (with --out)"
        raise ThawError(f"{flag} {out} {where}: the run's files would be read as images by the next run on it; {fix}")


def model_name(model: str | nn.Module | ModelAdapter) -> str:
    """What a run records as its model: the name, or a model object's class (module.QualifiedName)."""
    if isinstance(model, str):
        return model
    module = model.model if isinstance(model, ModelAdapter) else model
    return f"{type(module).__module__}.{type(module).__qualname__}"


def check_model_object(run: str | Path, recorded: dict, model: object, call: str) -> None:
    """A run trained on a model object (`recorded`: its settings or metadata) is rebuilt from the same architecture
    only: refuse none (saying how to pass it to `call`) and another class."""
    if recorded.get("model_source") != MODEL_OBJECT:
        return
    if model is None:
        raise ThawError(
            f"{run} was trained on a model object ({recorded['model']}), which no name rebuilds; from Python: "
            f"{call}({str(run)!r}, model=<a new instance of that model>)"
        )
    if model_name(model) != recorded["model"]:  # type: ignore[arg-type]
        raise ThawError(f"{run} was trained on {recorded['model']}, not {model_name(model)}; pass the same architecture")  # type: ignore[arg-type]


def model_groups(adapter: ModelAdapter) -> dict[str, list[str]]:
    """A model object's layer groups, each with its modules: a resume or a reload with another grouping (another
    head, other groups given to adapt) would apply the plan's selectors to other layers."""
    return {group.name: list(group.modules) for group in adapter.groups}


def _image_adapter(model: str | nn.Module | ModelAdapter, weights: str | None, classes: list[str]) -> ModelAdapter:
    """The adapter a run trains: built by name, or made from the model object given, with a head per class."""
    num_classes = len(classes)
    if isinstance(model, str):
        return build_model(model, weights=weights, num_classes=num_classes, keep_head=_trained_on(weights, classes))
    if weights not in ("DEFAULT", None):
        raise ThawError(f"weights={weights!r} goes with a model name; a model object brings its own weights: drop it")
    if isinstance(model, ModelAdapter):
        if isinstance(model.preprocessing, TextPreprocessing):  # its check would only say it is no Preprocessing
            raise ThawError("this adapter is a text model's (its preprocessing tokenizes); train it on a table with train_text")
        check_image_preprocessing(model.preprocessing)  # one built by hand: checked before the run folder is made
        check_float32(model.model)
        if model.num_classes != num_classes:
            raise ThawError(
                f"the adapter's head has {model.num_classes} outputs and the data {num_classes} classes; "
                f"pass the model itself, or thaw.adapt(model, num_classes={num_classes})"
            )
        check_class_scores(model, num_classes)
        return model
    if isinstance(model, nn.Module):
        check_float32(model)
        adapter = adapt(model, num_classes=num_classes)
        check_class_scores(adapter, num_classes)
        return adapter
    raise ThawError(f"model must be a name like 'mobilenet_v2' or 'timm/NAME', an nn.Module or a ModelAdapter, got a {type(model).__name__}")


def train_text(
    data_path: str | Path,
    *,
    model: str,
    out: str | Path,
    plan: Plan | str = "two-phase",
    plan_options: dict | None = None,
    config: TrainConfig = TrainConfig(),
    columns: TextColumns = TextColumns(),
    val_split: float = 0.1,
    test_split: float = 0.0,
    pooling: str = "mean",
    max_length: int = DEFAULT_MAX_LENGTH,
    resume: bool = False,
    overwrite: bool = False,
    callbacks: list[EpochCallback] | None = None,
    step_hooks: list[StepHook] | None = None,
) -> RunResult:
    """Fine-tune a Hugging Face encoder (`model`: a folder, a hub id, or hf/ORG/NAME as the command line takes it) on a
    CSV/TSV table of text and labels.

    `test_split` holds out a seeded stratified share first (for `thaw evaluate --split test`);
    `val_split` of the rest picks the best epoch. `resume` and `overwrite` as for train_images.
    """
    _check_call_types({"data_path": data_path, "out": out}, {"val_split": val_split, "test_split": test_split}, callbacks, step_hooks)
    val_split, test_split = float(val_split), float(test_split)  # as in train_images: thaw.json records them
    if not isinstance(model, (str, os.PathLike)) or not str(model).strip():  # None was looked up on the hub as 'None'
        raise ThawError(f"model must be a text encoder's folder or hub ID, like hf/sentence-transformers/all-MiniLM-L6-v2, got {model!r}")
    model = hf_source(model) if isinstance(model, str) else model  # "hf/ORG/NAME" was read as a missing folder
    _check_switches(resume=resume, overwrite=overwrite)
    _check_val_share(val_split, resume)
    if not isinstance(columns, TextColumns):  # a dict, or None: an AttributeError once the table was opened
        raise ThawError(f"columns must be a TextColumns (thaw.data.text.TextColumns(text='message', label='kind')), got {columns!r}")
    _check_arguments(plan, plan_options, config, resume)
    check_image_augments(config, "text", resumed=resume)  # before the table is read and the model built
    check_plan_before_data(model, None, "text", plan, plan_options, not resume)
    rules, digest = _recorded_split(Path(out), resume)
    data, rule = split_as_recorded(
        lambda rule: load_text_data(data_path, columns=columns, val_split=val_split, test_split=test_split, seed=config.seed, split_rule=rule),
        rules, digest,
    )
    torch.manual_seed(config.seed)
    adapter = build_text_model(model, num_classes=len(data.classes), pooling=pooling, max_length=max_length)
    if not (resume and (Path(out) / checkpoint.CHECKPOINT).is_file()):  # a run already trained keeps what it trained with
        check_max_length(max_length, adapter.model.tokenizer)
        read = adapter.preprocessing.max_length
        if read < max_length and distributed.from_environment().is_main:  # a warning, --quiet or not
            print(f"thaw: warning: max length {max_length} is more than {source_name(model)} reads; texts are cut at {read} tokens", file=sys.stderr, flush=True)
    meta = {
        "format": "thaw-run/1", "task": "text", "model": source_name(model), "weights": None, "classes": list(data.classes),
        "val_split": val_split, "test_split": test_split, "columns": asdict(columns), "pooling": pooling, "max_length": max_length,
        "data_path": str(Path(data_path).resolve()), "split_rule": rule,
    }
    return _run(adapter, data, data_path, plan, plan_options, config, Path(out), meta, resume, overwrite, callbacks, step_hooks)


def _recorded_split(out: Path, resume: bool) -> tuple[tuple[str, ...], str | None]:
    """The rules the run's table may be split by, and the digest of the samples its checkpoint trained on: today's
    rule, except in a run resumed from a checkpoint made with an earlier one (recorded in its settings, or known by
    what they lack), which continues on the split it started with."""
    if not (resume and (out / checkpoint.CHECKPOINT).is_file()):
        return (SPLIT_RULE,), None
    settings = saved_settings(out) or {}
    return recorded_split_rules(settings, f"the checkpoint in {out}"), settings.get("samples")


def _check_call_types(paths: dict[str, object], shares: dict[str, object], callbacks: object, step_hooks: object) -> None:
    """The Python API's arguments of the wrong type, one line each, before any work: they ended in Python's own
    TypeError from deep inside (`out=None`, `val_split="0.2"`, `callbacks=print`). An empty string as a path is
    refused as the CLI refuses it: an unset variable, that would be the current folder. Shares of another number
    type (numpy's float32) are taken: the callers turn them into floats, which thaw.json can record."""
    for name, value in paths.items():
        if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
            raise ThawError(f"{name} must be a path (a str or pathlib.Path) that is not empty, got {value!r}")
    for name, value in shares.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ThawError(f"{name} must be a number like 0.2, got {value!r}")
    for name, hooks in (("callbacks", callbacks), ("step_hooks", step_hooks)):
        if hooks is not None and (not isinstance(hooks, (list, tuple)) or not all(callable(hook) for hook in hooks)):
            raise ThawError(f"{name} must be a list of functions, got {hooks!r}")
        for index, hook in enumerate(hooks or ()):
            _check_hook_takes(f"{name}[{index}]", hook, HOOK_CALLS[name])


# How each kind of hook is called (thaw.train.fit.EpochCallback, StepHook): a hook that cannot take that failed only
# after the first epoch (or step) had trained, as a TypeError, leaving an unfinished run folder behind.
HOOK_CALLS = {"callbacks": ("callback", ("state",)), "step_hooks": ("hook", ("optimizer", "step", "lr_multiplier"))}


def _check_hook_takes(name: str, hook: object, call: tuple[str, tuple[str, ...]]) -> None:
    try:
        signature = inspect.signature(hook)
    except (TypeError, ValueError):  # a builtin or extension function without a signature: called as it is
        return
    function, arguments = call
    try:
        signature.bind(*arguments)
    except TypeError as error:
        hint = "; pass an instance, not the class" if isinstance(hook, type) else ""
        named = getattr(hook, "__qualname__", type(hook).__qualname__)
        raise ThawError(f"{name} ({named}) cannot be called as {function}({', '.join(arguments)}): {error}{hint}") from None


def _holds_run_to_continue(out: Path) -> bool:
    """Whether a resume into `out` continues a run (its checkpoint) or finds it finished (its METADATA)."""
    return (out / checkpoint.CHECKPOINT).is_file() or is_finished(out)


def _check_val_split_is_read(val_split: float, data_path: Path) -> None:
    """A share given for data with a val folder would change nothing (that folder is the val split), unsaid."""
    if "val" in split_folders(data_path):
        raise ThawError(
            f"val_split (--val-split) {val_split:g} would do nothing: {data_path} has a val folder, which is the val split; "
            "leave it unset, or move those images into train/ to have a share held out"
        )


def _check_val_share(val_split: float, resume: bool) -> None:
    """Checked for a new run even where unread: beside a val/ folder val_split=1.5 ran to the end unsaid. A resume
    passes the share its run recorded, which an older thaw accepted unchecked there: it continues as it began."""
    if not resume and not 0 < val_split < 1:
        raise ThawError(f"val_split must be a share above 0 and below 1, like 0.2, got {val_split!r}")


def _check_switches(**switches: object) -> None:
    """resume and overwrite as True or False (numpy's bools, 0 and 1 too): a string ("no", "false", from a config or the
    environment) is true in Python, and overwrite="no" replaced a finished run."""
    for name, value in switches.items():
        check_switch(name, value)


def _check_arguments(plan: object, plan_options: dict | None, config: object, resume: bool) -> None:
    """What train_images and train_text are given, checked before any data is read: one line for each mistake that
    would otherwise surface as a TypeError or AttributeError deep inside."""
    if not isinstance(config, TrainConfig):
        raise ThawError(f"config must be a TrainConfig (thaw.train.TrainConfig(batch_size=...)), got a {type(config).__name__}")
    check_device(config.device)  # a device this machine lacks: said before the data is read and the run folder made
    if not isinstance(plan, (str, Plan)):
        raise ThawError(f"plan must be a strategy name like 'two-phase' or a Plan (thaw.build_plan, thaw.load_plan), got a {type(plan).__name__}")
    if isinstance(plan, Plan) and not resume:  # a run's saved plan, made before names had to differ, still resumes
        check_stage_names(plan)
    check_plan_options({} if plan_options is None else plan_options)
    if plan_options and not isinstance(plan, str):  # a Plan gives its own stages: the options would be ignored
        raise ThawError(f"plan_options ({', '.join(sorted(plan_options))}) go with a strategy name; a Plan gives its own stages: drop them")


def _run(
    adapter: ModelAdapter, data: ImageData | TextData, data_path: str | Path, plan: Plan | str, plan_options: dict | None,
    config: TrainConfig, out: Path, meta: dict, resume: bool, overwrite: bool, callbacks: list[EpochCallback] | None,
    step_hooks: list[StepHook] | None,
) -> RunResult:
    # before check_plan, which adds a lora plan's adapters (PEFT freezes every other weight there, the head too)
    given = {id(param): param.requires_grad for param in adapter.model.parameters()}
    plan = check_plan(adapter, plan, plan_options, not resume)  # on the model itself (a model object's first check): before fit sets anything aside
    check_batch_statistics(adapter, plan, config.batch_size)
    try:
        result = fit(
            adapter, data, plan, config, out, meta=meta, resume=resume, overwrite=overwrite, callbacks=callbacks, step_hooks=step_hooks
        )
    finally:  # a model object the caller passed comes back without thaw's stage on it (see release)
        release(adapter.model, given)
    if not distributed.from_environment().is_main:  # under torchrun, rank 0 writes the run folder
        result.files = {}
        return result
    with signals_held(result.held_signal):  # a Ctrl-C now comes after the last file, not between two of them
        result.files = _write_finished_run(adapter, data, data_path, plan, config, out, meta, result)
    return result


def _write_finished_run(
    adapter: ModelAdapter, data: ImageData | TextData, data_path: str | Path, plan: Plan, config: TrainConfig, out: Path, meta: dict,
    result: RunResult,
) -> dict[str, Path]:
    metadata = meta | {
        "family": adapter.family,
        "head": adapter.head_name,
        "groups": adapter.group_names,
        "preprocessing": preprocessing_dict(effective_preprocessing(adapter, config)),
        "plan": plan_to_dict(result.plan),  # with --budget: the epochs it chose
        "train_config": asdict(config),
        "data": {"path": str(Path(data_path).resolve()), "layout": data.layout, "train": len(data.train), "val": len(data.val), "test": len(data.test or ()),
                 "samples": samples_digest(data)},  # so evaluation can tell whether it rebuilds the same split
        "skipped_files": [{"path": p, "reason": r} for p, r in result.skipped],
        "best": {k: v for k, v in result.best.items() if k != "val"} | {"val": {k: v for k, v in result.best.get("val", {}).items() if k != "confusion"}},
        "wall_s": result.wall_s,
        "budget": result.budget,
        "images_per_s": result.images_per_s,
    }
    # What loading the run needs besides the weights comes first: write_run's METADATA says the run is complete.
    saved = {"adapter": save_adapter(out, adapter, data.classes)} if plan.lora is not None else {}
    if meta.get("task") == "text":
        saved["text_model"] = save_text_model(out, adapter)
    return write_run(out, metadata, result.history, list(data.classes), result.best) | saved


def saved_settings(run: str | Path) -> dict | None:
    """The settings a run's checkpoint recorded (what `resume_run` continues with) and its data path;
    None when there is no checkpoint yet, or an older thaw wrote it."""
    from thaw.train.run_folder import FINISHED_CHECKPOINT_REMEDY, is_finished

    path = Path(run) / checkpoint.CHECKPOINT
    if not path.is_file():
        return None
    saved = checkpoint.load_checkpoint(path, *([FINISHED_CHECKPOINT_REMEDY] if is_finished(Path(run)) else []))
    return saved["settings"] | {"data_path": saved.get("data_path")} if "settings" in saved else None


def resume_run(
    run: str | Path,
    *,
    data_path: str | Path | None = None,
    model: nn.Module | ModelAdapter | None = None,
    callbacks: list[EpochCallback] | None = None,
    step_hooks: list[StepHook] | None = None,
    **runtime: object,
) -> RunResult:
    """Continue the run in `run` with its own settings (model, weights, plan, training options, data).

    `data_path` points at the data when it moved (it must hold the same files); `model`: a run trained on a model
    object needs the same architecture again (a fresh instance: the checkpoint holds the weights); `runtime` may set
    what does not change the recipe: workers, device, quiet, strict, cache_memory_gb, decoded_memory_gb, compile.
    """
    from thaw.train.run_folder import finished_result, is_finished
    from thaw.train.settings import differences

    unknown = sorted(set(runtime) - RUNTIME_FIELDS)
    if unknown:
        raise ThawError(f"{', '.join(unknown)} would change the run; a resume keeps the run's own settings")
    _check_call_types({"run": run} | ({"data_path": data_path} if data_path is not None else {}), {}, callbacks, step_hooks)
    if Path(run).is_file():  # RUN/thaw.json, say: as load_run says it
        raise ThawError(f"{run} is a file of a run; pass the run's folder, {Path(run).parent}")
    if not Path(run).is_dir():
        raise ThawError(f"{run}: no such run folder; pass the folder a run wrote (its out, --out)")
    settings = saved_settings(run)
    if settings is None:
        raise ThawError(
            f"{run} holds no checkpoint that records its settings (none yet, or an older thaw wrote it); "
            "give DATA and the run's options to start or resume it"
        )
    check_model_object(run, settings, model, "resume_run")
    if is_finished(Path(run)):  # nothing left to train: the run's result as recorded, its files as they are
        if model is not None and "model_groups" in settings:  # grouped otherwise, a resume that trains would refuse it
            given = model_groups(_image_adapter(model, None, list(settings["classes"])))
            found = differences({"model_groups": settings["model_groups"]}, {"model_groups": given})
            if found:
                raise ThawError(f"the run in {run} was started with other settings; different now: {'; '.join(found)}")
        return finished_result(Path(run))
    if data_path is not None and not Path(data_path).exists():  # the path typed, not the run's own
        raise ThawError(f"{data_path} does not exist; pass where the run's data is now as DATA, or leave DATA out")
    data_path = data_path or settings["data_path"]
    if data_path is None or not Path(data_path).exists():
        raise ThawError(f"the run's data was at {data_path}, which does not exist now; pass its new place as DATA")
    config = config_from_settings(settings, **runtime)
    plan = plan_from_dict(settings["plan"], f"{run} plan")
    options = {"plan": plan, "config": config, "out": run, "resume": True, "callbacks": callbacks, "step_hooks": step_hooks}
    if settings.get("task") == "text":
        return train_text(
            data_path, model=settings["model"], columns=TextColumns(**settings["columns"]), val_split=settings["val_split"],
            test_split=settings["test_split"], pooling=settings["pooling"], max_length=settings["max_length"], **options,
        )
    chosen = settings["model"] if model is None else model
    return train_images(data_path, model=chosen, weights=settings["weights"], val_split=settings["val_split"], **options)
