"""Training: run a plan on labelled images or text and leave a run folder behind."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from thaw.data.folders import ImageData, discover
from thaw.data.text import TextColumns, TextData, load_text_data
from thaw.export.run_dir import preprocessing_dict, save_adapter, save_text_model, write_run
from thaw.models import ModelAdapter, build_model
from thaw.models.hf_text import DEFAULT_MAX_LENGTH, build_text_model
from thaw.models.lora import add_lora
from thaw.plan import Plan, build_plan, plan_to_dict
from thaw.train.config import TrainConfig
from thaw import distributed
from thaw.train.fit import EpochCallback, RunResult, RunState, StepHook, effective_preprocessing, fit

__all__ = ["EpochCallback", "RunResult", "RunState", "TextColumns", "TrainConfig", "train_images", "train_text"]


def train_images(
    data_path: str | Path,
    *,
    model: str,
    out: str | Path,
    weights: str | None = "DEFAULT",
    plan: Plan | str = "two-phase",
    plan_options: dict | None = None,
    config: TrainConfig = TrainConfig(),
    val_split: float = 0.2,
    resume: bool = False,
    callbacks: list[EpochCallback] | None = None,
    step_hooks: list[StepHook] | None = None,
) -> RunResult:
    """Fine-tune `model` on the images at `data_path` by `plan` (a Plan or a strategy name)."""
    data = discover(data_path, val_split=val_split, seed=config.seed)
    torch.manual_seed(config.seed)  # the new head's initial weights are part of the run's seed
    adapter = build_model(model, weights=weights, num_classes=len(data.classes))
    meta = {"format": "thaw-run/1", "task": "image", "model": model, "weights": weights, "classes": list(data.classes), "val_split": val_split}
    return _run(adapter, data, data_path, plan, plan_options, config, Path(out), meta, resume, callbacks, step_hooks)


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
    callbacks: list[EpochCallback] | None = None,
    step_hooks: list[StepHook] | None = None,
) -> RunResult:
    """Fine-tune a Hugging Face encoder (`model`: a folder or hub id) on a CSV/TSV table of text and labels.

    `test_split` holds out a seeded stratified share first (for `thaw evaluate --split test`);
    `val_split` of the rest picks the best epoch.
    """
    data = load_text_data(data_path, columns=columns, val_split=val_split, test_split=test_split, seed=config.seed)
    torch.manual_seed(config.seed)
    adapter = build_text_model(model, num_classes=len(data.classes), pooling=pooling, max_length=max_length)
    meta = {
        "format": "thaw-run/1", "task": "text", "model": model, "weights": None, "classes": list(data.classes),
        "val_split": val_split, "test_split": test_split, "columns": asdict(columns),
    }
    out = Path(out)
    result = _run(adapter, data, data_path, plan, plan_options, config, out, meta, resume, callbacks, step_hooks)
    if distributed.from_environment().is_main:
        result.files["text_model"] = save_text_model(out, adapter)
    return result


def _run(
    adapter: ModelAdapter, data: ImageData | TextData, data_path: str | Path, plan: Plan | str, plan_options: dict | None,
    config: TrainConfig, out: Path, meta: dict, resume: bool, callbacks: list[EpochCallback] | None, step_hooks: list[StepHook] | None,
) -> RunResult:
    if isinstance(plan, str):
        plan = build_plan(plan, num_groups=len(adapter.groups), **(plan_options or {}))
    if plan.lora is not None:
        add_lora(adapter, plan.lora)
    result = fit(adapter, data, plan, config, out, meta=meta, resume=resume, callbacks=callbacks, step_hooks=step_hooks)
    if not distributed.from_environment().is_main:  # under torchrun, rank 0 writes the run folder
        result.files = {}
        return result
    metadata = meta | {
        "family": adapter.family,
        "head": adapter.head_name,
        "groups": adapter.group_names,
        "preprocessing": preprocessing_dict(effective_preprocessing(adapter, config)),
        "plan": plan_to_dict(plan),
        "train_config": asdict(config),
        "data": {"path": str(data_path), "layout": data.layout, "train": len(data.train), "val": len(data.val), "test": len(data.test or ())},
        "skipped_files": [{"path": p, "reason": r} for p, r in result.skipped],
        "best": {k: v for k, v in result.best.items() if k != "val"} | {"val": {k: v for k, v in result.best.get("val", {}).items() if k != "confusion"}},
        "wall_s": result.wall_s,
        "images_per_s": result.images_per_s,
    }
    result.files = write_run(out, metadata, result.history, list(data.classes), result.best)
    if plan.lora is not None:
        result.files["adapter"] = save_adapter(out, adapter, metadata["plan"])
    return result
