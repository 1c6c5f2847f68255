"""Using a finished run: evaluate it on a split, predict classes for image files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from thaw.data.folders import discover, suffix_is_image
from thaw.data.images import UnreadableImage, load_rgb
from thaw.data.loaders import ImageDataset, make_loader
from thaw.data.transforms import eval_transform
from thaw.errors import ThawError
from thaw.models import ModelAdapter
from thaw.train.config import TrainConfig
from thaw.train.fit import choose_engine
from thaw.train.loop import evaluate


def evaluate_run(adapter: ModelAdapter, meta: dict, data_path: str | Path, split: str = "val", batch_size: int = 64, quiet: bool = True) -> dict:
    """Metrics of the run's model on one split of `data_path`; classes must match the run's."""
    config = meta.get("train_config", {})
    data = discover(data_path, val_split=meta.get("val_split", 0.2), seed=config.get("seed", 0))
    if list(data.classes) != meta["classes"]:
        raise ThawError(
            f"the data's classes ({', '.join(data.classes[:6])}) differ from the run's ({', '.join(meta['classes'][:6])}); "
            "evaluate on data with the same class folders"
        )
    engine = choose_engine(TrainConfig(quiet=quiet), adapter.model)
    adapter.model.to(engine.device)
    dataset = ImageDataset(data.split(split), eval_transform(adapter.preprocessing), 2 * adapter.preprocessing.resize_size)
    loader = make_loader(dataset, batch_size=batch_size, shuffle=False, seed=0)
    metrics = evaluate(adapter.model, loader, engine, len(data.classes), label=split)
    skipped = list(data.skipped) + engine.failed
    return metrics | {"split": split, "classes": list(data.classes), "skipped_files": len(skipped)}


def image_files(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and suffix_is_image(p))
        elif path.is_file():
            files.append(path)
        else:
            raise ThawError(f"{path} does not exist; pass image files or folders")
    if not files:
        raise ThawError(f"no image files found in {', '.join(paths)}")
    return files


@dataclass
class Prediction:
    path: str
    labels: list[tuple[str, float]]


@torch.no_grad()
def predict_files(adapter: ModelAdapter, classes: list[str], files: list[Path], top_k: int = 3, batch_size: int = 32) -> tuple[list[Prediction], list[tuple[str, str]]]:
    engine = choose_engine(TrainConfig(quiet=True), adapter.model)
    adapter.model.to(engine.device).eval()
    transform = eval_transform(adapter.preprocessing)
    predictions, skipped = [], []
    for start in range(0, len(files), batch_size):
        batch, kept = [], []
        for path in files[start : start + batch_size]:
            try:
                batch.append(transform(load_rgb(path, 2 * adapter.preprocessing.resize_size)))
                kept.append(path)
            except UnreadableImage as reason:
                skipped.append((str(path), str(reason)))
        if not batch:
            continue
        with engine.autocast():
            logits = adapter.model(engine.to_device(torch.stack(batch)))
        probabilities = logits.float().softmax(dim=1).cpu()
        top = probabilities.topk(min(top_k, len(classes)), dim=1)
        for path, values, indices in zip(kept, top.values, top.indices):
            predictions.append(Prediction(str(path), [(classes[i], float(v)) for v, i in zip(values, indices)]))
    return predictions, skipped
