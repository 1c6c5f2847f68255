"""Training: run a plan on a folder of labelled images and leave a run folder behind."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from thaw.data.folders import discover
from thaw.export.run_dir import preprocessing_dict, write_run
from thaw.models import build_model
from thaw.plan import Plan, build_plan, plan_to_dict
from thaw.train.config import TrainConfig
from thaw.train.fit import EpochCallback, RunResult, RunState, effective_preprocessing, fit

__all__ = ["EpochCallback", "RunResult", "RunState", "TrainConfig", "train_images"]


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
) -> RunResult:
    """Fine-tune `model` on the images at `data_path` by `plan` (a Plan or a strategy name)."""
    data = discover(data_path, val_split=val_split, seed=config.seed)
    torch.manual_seed(config.seed)  # the new head's initial weights are part of the run's seed
    adapter = build_model(model, weights=weights, num_classes=len(data.classes))
    if isinstance(plan, str):
        plan = build_plan(plan, num_groups=len(adapter.groups), **(plan_options or {}))
    out = Path(out)
    meta = {"format": "thaw-run/1", "model": model, "weights": weights, "classes": list(data.classes), "val_split": val_split}
    result = fit(adapter, data, plan, config, out, meta=meta, resume=resume, callbacks=callbacks)
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
    return result
