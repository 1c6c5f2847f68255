"""`thaw demo`: the offline showcase that runs right after install."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from thaw.cli.options import path_text
from thaw.demo import IMAGE_SIZE, MODEL, WEIGHTS, check_not_in_class_folders, run_demo
from thaw._io import check_writable
from thaw.plan.report import render_table


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("demo", help="fine-tune MobileNetV2 on real handwritten digits, two strategies side by side")
    parser.add_argument("--out", type=path_text, default="runs/demo")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(handler=run)


def writable_folder(text: str) -> Path:
    """Checked before the demo spends its minute training: a folder thaw can create and write in."""
    folder = Path(text)
    check_not_in_class_folders(folder)  # before the check makes the folder
    check_writable(folder)
    return folder


def run(args: argparse.Namespace) -> int:
    rows = run_demo(writable_folder(args.out), say=(lambda _: None) if args.json else print)
    if args.json:
        keys = ("strategy", "trainable_share", "wall_s", "test_accuracy")
        print(json.dumps([{key: getattr(r, key) for key in keys} | {"out": str(r.out)} for r in rows]))
        return 0
    print(f"\n{MODEL} {WEIGHTS} on scikit-learn's digits (1,797 real scans, 10 classes) at {IMAGE_SIZE} px")
    table = [[r.strategy, f"{100 * r.trainable_share:.1f}%", f"{r.wall_s:.1f} s", f"{r.test_accuracy:.4f}"] for r in rows]
    print(render_table(table, ["strategy", "trainable", "wall time", "test accuracy"]))
    for row in rows:
        print(f"{row.strategy}: {row.out}/curves.png, {row.out}/confusion.png")
    return 0
