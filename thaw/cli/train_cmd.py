"""`thaw train DATA --model M --strategy S --out RUN`: run a plan, leave a run folder."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields, replace
from pathlib import Path

from thaw import distributed
from thaw.cli.options import add_model_options, add_plan_options, plan_from_args, positive_int
from thaw.models import build_model
from thaw.models.hf_text import DEFAULT_MAX_LENGTH, POOLINGS, build_text_model
from thaw.models.sources import TASKS, hf_source, task_of
from thaw.train import RunResult, RunState, TextColumns, TrainConfig, train_images, train_text
from thaw.train.config import METRICS, PRECISIONS, SCHEDULES
from thaw.plan.optim import OPTIMIZERS


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("train", help="fine-tune a model on labelled images or text")
    parser.add_argument("data", help="images: folder with train/ and val/, folder of class folders, or CSV manifest; text: a CSV/TSV table")
    add_model_options(parser)
    parser.set_defaults(weights="DEFAULT")
    add_plan_options(parser)
    add_training_options(parser)
    add_text_options(parser)
    parser.add_argument("--out", help="run folder (default runs/MODEL-STRATEGY)")
    parser.add_argument("--resume", metavar="RUN", help="continue the run in RUN from its last checkpoint")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of results")
    parser.set_defaults(handler=run)


def add_training_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--batch-size", type=int, default=32)
    group.add_argument("--val-split", type=float, help="share held out for validation when DATA has no val/ (images 0.2, text 0.1)")
    group.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    group.add_argument("--schedule", choices=SCHEDULES, default="cosine")
    group.add_argument("--warmup", type=float, default=0.1, help="share of each stage's steps spent warming up")
    group.add_argument("--precision", choices=PRECISIONS, default="auto", help="auto: bf16 where the device supports it")
    group.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    group.add_argument("--grad-clip", type=float)
    group.add_argument("--accumulate", type=int, default=1, help="gradient accumulation steps")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--workers", type=positive_int, help="DataLoader workers (default: 0 below 4 cores)")
    group.add_argument("--metric", choices=METRICS, default="accuracy", help="validation metric that picks the best epoch")
    group.add_argument("--early-stopping", type=int, metavar="EPOCHS", help="end a stage after this many epochs without improvement")
    group.add_argument("--no-augment", dest="augment", action="store_false")
    group.add_argument("--image-size", type=int, help="override the weights' input size")
    group.add_argument("--strict", action="store_true", help="fail on unreadable files instead of skipping them")
    group.add_argument("--device", default="auto")
    group.add_argument("--no-cache", dest="cache", action="store_false", help="never train on cached frozen features")
    group.add_argument("--cache-views", type=positive_int, default=0, metavar="K", help="cache K augmented views per image (default: the evaluation view)")
    group.add_argument("--quiet", action="store_true")


def add_text_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("text (Hugging Face encoders)")
    group.add_argument("--task", choices=TASKS, help="default: text when --model is a Hugging Face folder (config.json) or hf/ID, else image")
    group.add_argument("--text-column", help="name or 0-based position of the text column (default: inferred)")
    group.add_argument("--label-column", help="name or 0-based position of the label column (default: inferred)")
    group.add_argument("--delimiter", help="column separator (default: tab for .tsv or tab-separated files, else comma)")
    group.add_argument("--test-split", type=float, default=0.0, help="share held out first as a test split (thaw evaluate --split test)")
    group.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH, help="tokens kept per text")
    group.add_argument("--pooling", choices=POOLINGS, default="mean", help="how token states become one vector")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{name: getattr(args, name) for name in names if hasattr(args, name)})


def print_epoch(state: RunState) -> None:
    row = state.history[-1]
    top5 = f" top5 {row['val_top5']:.3f}" if row.get("val_top5") is not None else ""
    print(
        f"{row['stage']} {row['stage_epoch']}: train loss {row['train_loss']:.3f} acc {row['train_accuracy']:.3f} | "
        f"val loss {row['val_loss']:.3f} acc {row['val_accuracy']:.3f} f1 {row['val_macro_f1']:.3f}{top5} "
        f"({row['seconds']:.1f} s, {row['images_per_s']:.0f} img/s)",
        flush=True,
    )


def _start(args: argparse.Namespace, config: TrainConfig, out: Path) -> RunResult:
    callbacks = [] if config.quiet else [print_epoch]
    if task_of(args) == "text":
        adapter = build_text_model(hf_source(args.model), num_classes=2, device="meta", load=False)
        columns = TextColumns(args.text_column, args.label_column, args.delimiter)
        return train_text(
            args.data, model=hf_source(args.model), plan=plan_from_args(args, len(adapter.groups)), config=config, out=out,
            columns=columns, val_split=0.1 if args.val_split is None else args.val_split, test_split=args.test_split,
            pooling=args.pooling, max_length=args.max_length, resume=bool(args.resume), callbacks=callbacks,
        )
    adapter_groups = len(build_model(args.model, num_classes=2, device="meta").groups)
    return train_images(
        args.data, model=args.model, weights=args.weights, plan=plan_from_args(args, adapter_groups), config=config, out=out,
        val_split=0.2 if args.val_split is None else args.val_split, resume=bool(args.resume), callbacks=callbacks,
    )


def run(args: argparse.Namespace) -> int:
    out = Path(args.resume or args.out or f"runs/{Path(args.model).name or args.model.replace('/', '_')}-{args.strategy}")
    config = config_from_args(args)
    main_rank = distributed.from_environment().is_main  # under torchrun only rank 0 prints
    if args.json or not main_rank:
        config = replace(config, quiet=True)
    result = _start(args, config, out)
    if not main_rank:
        return 0
    best = result.best
    if args.json:
        summary = {
            "val_accuracy": best["val"]["accuracy"], "best_epoch": best["epoch"], "wall_s": round(result.wall_s, 2),
            "images_per_s": round(result.images_per_s, 1), "skipped_files": len(result.skipped), "out": str(out),
        }
        print(json.dumps(summary))
        return 0
    print(f"best val {best['metric']} {best['value']:.4f} at epoch {best['epoch']} ({best['stage']}); {result.wall_s:.1f} s")
    print("wrote " + ", ".join(str(p) for p in result.files.values()))
    return 0
