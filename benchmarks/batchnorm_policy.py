"""What happens to val accuracy when pretrained layers unfreeze, per BatchNorm policy.

Plan: 3 head epochs (BatchNorm frozen), then 2 epochs of everything with the
policy under test. Digits are scikit-learn's 8x8 scans upscaled to 96 px: far
from ImageNet's statistics, like many real datasets (medical, documents, satellite).

    .venv/bin/python benchmarks/batchnorm_policy.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import HYMENOPTERA, offline_torch_home, scratch  # noqa: E402

from thaw.data.digits import write_digits_folder  # noqa: E402
from thaw.plan import ConstantLr, Plan, RangeLr, Stage  # noqa: E402
from thaw.plan.report import render_table  # noqa: E402
from thaw.train import TrainConfig, train_images  # noqa: E402


def plan(policy: str) -> Plan:
    return Plan((Stage("head", 3, ("head",), ConstantLr(1e-3)), Stage("all", 2, ("all",), RangeLr(5e-6, 5e-4), 0.01, policy)))


def main() -> None:
    offline_torch_home()
    datasets = {
        # No weight average: it would also average the BatchNorm statistics whose policies this compares.
        "hymenoptera (224 px)": (HYMENOPTERA, TrainConfig(quiet=True, ema=False)),
        "digits (96 px)": (write_digits_folder(scratch("digits")), TrainConfig(image_size=96, augment=False, batch_size=64, quiet=True, ema=False)),
    }
    rows = []
    for name, (data, config) in datasets.items():
        # Once every layer trains, "frozen" and "train" both let BatchNorm use batch statistics.
        for policy in ("frozen", "eval"):
            result = train_images(data, model="mobilenet_v2", weights="IMAGENET1K_V1", plan=plan(policy), config=config, out=scratch(policy))
            accuracies = [row["val_accuracy"] for row in result.history]
            rows.append([name, {"frozen": "batch statistics (frozen/train)", "eval": "fixed statistics (eval)"}[policy], f"{accuracies[2]:.3f}", " ".join(f"{a:.3f}" for a in accuracies[3:])])
    print(render_table(rows, ["data", "BatchNorm once unfrozen", "val acc after head", "val acc, unfrozen epochs"]))


if __name__ == "__main__":
    main()
