"""A run folder: safetensors weights plus JSON (loading it never runs code), metrics.csv, plots."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict
from pathlib import Path

import torch
import torchvision
from safetensors.torch import load_file

from thaw._io import atomic_write
from thaw._version import __version__
from thaw.errors import ThawError
from thaw.export.plots import plot_confusion, plot_curves
from thaw.models import ModelAdapter, Preprocessing, build_model
from thaw.models.weights import load_into

METADATA = "thaw.json"
WEIGHTS = "model.safetensors"
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
    adapter = build_model(meta["model"], weights=meta.get("weights"), num_classes=len(meta["classes"]), load=False)
    load_into(adapter.model, load_file(str(weights_path)), str(weights_path))
    adapter.preprocessing = Preprocessing(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["preprocessing"].items()})
    adapter.model.to(device).eval()
    return adapter, meta


def preprocessing_dict(preprocessing: Preprocessing) -> dict:
    return asdict(preprocessing)
