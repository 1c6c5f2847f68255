"""`thaw demo`: the offline showcase that runs right after install."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from thaw.demo import IMAGE_SIZE, MODEL, WEIGHTS, run_demo
from thaw.plan.report import render_table


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("demo", help="fine-tune MobileNetV2 on real handwritten digits, two strategies side by side")
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    rows = run_demo(Path(args.out), say=(lambda _: None) if args.json else print)
    if args.json:
        print(json.dumps([{"strategy": r.strategy, "trainable_share": r.trainable_share, "wall_s": r.wall_s, "test_accuracy": r.test_accuracy, "out": str(r.out)} for r in rows]))
        return 0
    print(f"\n{MODEL} {WEIGHTS} on scikit-learn's digits (1,797 real scans, 10 classes) at {IMAGE_SIZE} px")
    table = [[r.strategy, f"{100 * r.trainable_share:.1f}%", f"{r.wall_s:.1f} s", f"{r.test_accuracy:.4f}"] for r in rows]
    print(render_table(table, ["strategy", "trainable", "wall time", "test accuracy"]))
    for row in rows:
        print(f"{row.strategy}: {row.out}/curves.png, {row.out}/confusion.png")
    return 0
