"""Reading a run folder back: its metadata, the fine-tuned model, a LoRA adapter on a base model.

thaw.train.run_folder writes the folder and declares its file names.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from safetensors import safe_open
from safetensors.torch import load_file

from thaw.errors import ThawError, first_line
from thaw.models import ModelAdapter, Preprocessing, adapt, build_model
from thaw.models.hf_text import TextPreprocessing, build_text_model
from thaw.models.lora import add_lora
from thaw.models.weights import load_into
from thaw.plan.config import plan_from_dict
from thaw.plan.lora_targets import lora_targets
from thaw.train import MODEL_OBJECT, check_model_object, saved_settings
from thaw.train.checkpoint import CHECKPOINT
from thaw.train.run_folder import ADAPTER, METADATA, SET_ASIDE, TEXT_MODEL, WEIGHTS, read_run_json

__all__ = ["ADAPTER", "METADATA", "TEXT_MODEL", "WEIGHTS", "load_adapter", "load_run", "read_metadata"]


def read_metadata(run: Path) -> dict:
    path = Path(run) / METADATA
    if not path.is_file():
        raise ThawError(_why_no_metadata(Path(run)))
    return read_run_json(path, REQUIRED_METADATA, "retrain or restore it from a copy")


REQUIRED_METADATA = {"model": str, "classes": list, "preprocessing": dict, "plan": dict}  # what loading and reporting a run read


def _why_no_metadata(run: Path) -> str:
    """A folder without METADATA: a run stopped before its end (Ctrl-C, a crash) is still a run, and says how to finish."""
    if (run / CHECKPOINT).is_file():
        settings = saved_settings(run) or {}
        finish = f"resume_run({str(run)!r}, model=...) in Python" if settings.get("model_source") == MODEL_OBJECT else f"thaw train --resume {run}"
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
    from thaw.train.config import check_device
    from thaw.train.fit import resolve_device

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
    load_into(adapter.model, _read_weights(weights_path), str(weights_path))
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
        raise ThawError(f"{weights_path} is damaged ({first_line(error)}); retrain or restore it from a copy") from None
    return weights_path


def _image_model(run: Path, meta: dict, model: nn.Module | ModelAdapter | None) -> ModelAdapter:
    """The run's architecture with a head per class, its weights not loaded yet."""
    classes = len(meta["classes"])
    check_model_object(run, meta, model, "load_run")
    if model is None:
        return build_model(meta["model"], weights=meta.get("weights"), num_classes=classes, load=False)
    adapter = model if isinstance(model, ModelAdapter) else adapt(model, num_classes=classes)
    if adapter.num_classes != classes:
        raise ThawError(f"the model given has {adapter.num_classes} outputs and the run {classes} classes; pass the run's architecture")
    return adapter


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error type for a cut or foreign file
        raise ThawError(f"{path} is damaged ({first_line(error)}); retrain or restore it from a copy") from None


def load_adapter(adapter: ModelAdapter, path: str | Path) -> None:
    """Put a saved adapter onto a base model that already has the same LoRA layers."""
    state = load_file(str(path))
    unknown = sorted(set(state) - set(adapter.model.state_dict()))
    if unknown:
        raise ThawError(
            f"{path} holds tensors this model lacks ({', '.join(unknown[:3])}); build the same model with the same LoRA options"
        )
    adapter.model.load_state_dict(state, strict=False)


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
