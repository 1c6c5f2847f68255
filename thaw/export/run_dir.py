"""A run folder: safetensors weights plus JSON (loading it never runs code), metrics.csv, plots."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict
from pathlib import Path

import torch
import torchvision
from safetensors.torch import load_file, save_file

from thaw._io import atomic_write
from thaw._version import __version__
from thaw.errors import ThawError
from thaw.export.plots import plot_confusion, plot_curves
from thaw.models import ModelAdapter, Preprocessing, build_model
from thaw.models.hf_text import TextPreprocessing, build_text_model
from thaw.models.lora import adapter_param_names, add_lora
from thaw.models.weights import load_into
from thaw.plan.config import plan_from_dict
from thaw.plan.freeze import batchnorm_layers

METADATA = "thaw.json"
WEIGHTS = "model.safetensors"
ADAPTER = "adapter.safetensors"
TEXT_MODEL = "text-model"  # tokenizer files and the encoder's config.json
CSV_COLUMNS = ["epoch", "stage", "stage_index", "stage_epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_macro_f1", "val_top5", "images_per_s", "seconds", "cached"]


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda target: target.write_text(text))


def write_metrics_csv(path: Path, history: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    write_text(path, buffer.getvalue())


def versions() -> dict[str, str]:
    return {"thaw": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__}


def write_run(out: Path, metadata: dict, history: list[dict], classes: list[str], best: dict) -> dict[str, Path]:
    """Everything a user reads after a run; returns the files written."""
    write_text(out / METADATA, json.dumps(metadata | {"versions": versions()}, indent=2))
    write_metrics_csv(out / "metrics.csv", history)
    files = {"metadata": out / METADATA, "metrics": out / "metrics.csv", "weights": out / WEIGHTS}
    if history:
        files["curves"] = plot_curves(history, out / "curves.png")
    if best.get("val", {}).get("confusion"):
        files["confusion"] = plot_confusion(best["val"]["confusion"], classes, out / "confusion.png", f"val, epoch {best['epoch']}")
    return files


def read_metadata(run: Path) -> dict:
    path = Path(run) / METADATA
    if not path.is_file():
        raise ThawError(f"{run} is not a thaw run folder (no {METADATA}); pass the --out folder of thaw train")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise ThawError(f"{path} is damaged (not JSON); retrain or restore it from a copy") from None


def load_run(run: str | Path, device: str | torch.device = "cpu") -> tuple[ModelAdapter, dict]:
    """The fine-tuned model of a run, ready for inference, and its metadata."""
    run = Path(run)
    meta = read_metadata(run)
    weights_path = run / WEIGHTS
    if not weights_path.is_file():
        raise ThawError(f"{run} has no {WEIGHTS}; the run did not finish an epoch")
    if meta.get("task") == "text":
        adapter = _text_adapter(run, meta)
    else:
        adapter = build_model(meta["model"], weights=meta.get("weights"), num_classes=len(meta["classes"]), load=False)
        adapter.preprocessing = Preprocessing(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["preprocessing"].items()})
    if (meta.get("plan") or {}).get("lora"):  # the same LoRA layers as in training, so the weights fit
        add_lora(adapter, plan_from_dict(meta["plan"], f"{run}/{METADATA} plan").lora)
    load_into(adapter.model, load_file(str(weights_path)), str(weights_path))
    adapter.model.to(device).eval()
    return adapter, meta


def adapter_state_names(adapter: ModelAdapter, plan: dict) -> list[str]:
    """What a LoRA run changed: adapter weights, the head, and BatchNorm tensors a `train` stage moved
    (PEFT once left those out, so a reloaded model differed: huggingface/peft #1732)."""
    names = set(adapter_param_names(adapter.model)) | set(adapter.group("head").params)
    if any(stage.get("batchnorm") == "train" for stage in plan["stages"]):
        for layer_name, layer in batchnorm_layers(adapter.model):
            names.update(f"{layer_name}.{key}" for key in layer.state_dict())
    return [name for name in adapter.model.state_dict() if name in names]


def save_adapter(out: Path, adapter: ModelAdapter, plan: dict) -> Path:
    """ADAPTER beside the full weights: the best epoch's changed tensors only, for use on the base model."""
    best = load_file(str(out / WEIGHTS))
    kept = {name: best[name] for name in adapter_state_names(adapter, plan)}
    atomic_write(out / ADAPTER, lambda target: save_file(kept, str(target), metadata={"format": "thaw-lora/1"}))
    return out / ADAPTER


def load_adapter(adapter: ModelAdapter, path: str | Path) -> None:
    """Put a saved adapter onto a base model that already has the same LoRA layers."""
    state = load_file(str(path))
    unknown = sorted(set(state) - set(adapter.model.state_dict()))
    if unknown:
        raise ThawError(f"{path} holds tensors this model lacks ({', '.join(unknown[:3])}); build the same model with the same LoRA options")
    adapter.model.load_state_dict(state, strict=False)


def save_text_model(out: Path, adapter: ModelAdapter) -> Path:
    """The tokenizer and encoder config, so the run loads without the folder it was trained from."""
    folder = out / TEXT_MODEL
    adapter.tokenizer.save_pretrained(str(folder))
    adapter.model.encoder.config.save_pretrained(str(folder))
    return folder


def _text_adapter(run: Path, meta: dict) -> ModelAdapter:
    folder = run / TEXT_MODEL
    if not (folder / "config.json").is_file():
        raise ThawError(f"{run} has no {TEXT_MODEL}/config.json; the text run did not finish, or the folder was copied in part")
    pre = meta["preprocessing"]
    adapter = build_text_model(str(folder), num_classes=len(meta["classes"]), pooling=pre["pooling"], max_length=pre["max_length"], load=False)
    adapter.preprocessing = TextPreprocessing(**pre)
    return adapter


def preprocessing_dict(preprocessing: Preprocessing | TextPreprocessing) -> dict:
    return asdict(preprocessing)
