"""Val accuracy of the built-in strategies on hymenoptera with the real MobileNetV2 weights.

    .venv/bin/python benchmarks/accuracy.py
"""

from __future__ import annotations

import sys

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))

from _common import HYMENOPTERA, offline_torch_home, scratch  # noqa: E402

from thaw.plan.report import render_table  # noqa: E402
from thaw.train import TrainConfig, train_images  # noqa: E402

RUNS = {"feature-extract": {"epochs": 3}, "two-phase": {"head_epochs": 3, "epochs": 2}}


def main() -> None:
    offline_torch_home()
    rows = []
    for strategy, options in RUNS.items():
        result = train_images(
            HYMENOPTERA, model="mobilenet_v2", weights="IMAGENET1K_V1", plan=strategy, plan_options=options,
            config=TrainConfig(quiet=True), out=scratch(strategy),
        )
        per_epoch = " ".join(f"{row['val_accuracy']:.3f}" for row in result.history)
        rows.append([strategy, str(options), f"{result.best['val']['accuracy']:.4f}", str(result.best["epoch"]), f"{result.wall_s:.1f} s", per_epoch])
    print(render_table(rows, ["strategy", "epochs", "best val acc", "best epoch", "wall", "val acc per epoch"]))


if __name__ == "__main__":
    main()
