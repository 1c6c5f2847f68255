"""`thaw lr-find DATA --model M`: the lr range test, a plot, and a suggested lr."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from thaw.cli.options import add_model_options
from thaw.data.folders import discover
from thaw.models import build_model
from thaw.train.config import TrainConfig
from thaw.train.lr_find import lr_range_test, plot_lr_find, suggest


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("lr-find", help="lr range test: plot loss against lr and suggest one")
    parser.add_argument("data")
    add_model_options(parser)
    parser.set_defaults(weights="DEFAULT")
    parser.add_argument("--train", nargs="+", default=["head"], help="selectors that train during the test (default: head)")
    parser.add_argument("--start", type=float, default=1e-7)
    parser.add_argument("--end", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default="lr_find.png", help="where to write the plot")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    data = discover(args.data)
    torch.manual_seed(0)
    adapter = build_model(args.model, weights=args.weights, num_classes=len(data.classes))
    config = TrainConfig(batch_size=args.batch_size, quiet=True)
    lrs, losses = lr_range_test(adapter, data, train=tuple(args.train), start=args.start, end=args.end, steps=args.steps, config=config)
    suggestion = suggest(lrs, losses)
    picture = plot_lr_find(lrs, losses, suggestion, Path(args.out))
    if args.json:
        print(json.dumps({"suggested_lr": suggestion, "plot": str(picture), "lrs": lrs, "losses": losses}))
    else:
        print(f"suggested lr {suggestion:.2e} (steepest fall of the loss); plot: {picture}")
    return 0
