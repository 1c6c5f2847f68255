"""Which epoch to deliver: rules that look at val only, compared on held-out test accuracy over seeds.

Reads the JSON lines of `benchmarks/recipes.py --test-every-epoch` (each run's val accuracy and val loss after every
epoch, and, as a diagnostic, the test accuracy of the weights of every epoch) and, for each rule, takes the epoch
the rule picks from val and reports that epoch's test accuracy: mean and spread over seeds, per set and model.
Test chooses nothing inside a rule; comparing the rules on test is the choice of the rule itself (issue 12, item 5),
and the table also shows the best epoch in hindsight (test's own pick) as a ceiling no rule can reach.

    .venv/bin/python benchmarks/recipes.py --sets hymenoptera digits caltech40 --recipes thaw --seeds 0 1 2 3 4 5 \\
        --test-every-epoch > runs.jsonl
    .venv/bin/python benchmarks/delivery_rules.py runs.jsonl [more.jsonl ...] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Callable

Rule = Callable[[list[float], list[float], int], int]  # (val accuracies, val losses, val images) -> epoch index


def best_accuracy_then_loss(accuracy: list[float], loss: list[float], _images: int) -> int:
    """thaw's rule: the best val accuracy; among tied epochs the lowest val loss."""
    best = max(accuracy)
    return min((index for index, value in enumerate(accuracy) if value == best), key=lambda index: loss[index])


def lowest_loss(_accuracy: list[float], loss: list[float], _images: int) -> int:
    return min(range(len(loss)), key=lambda index: loss[index])


def best_accuracy_first(accuracy: list[float], _loss: list[float], _images: int) -> int:
    """The hand loop's and fastai's rule: the first epoch with the best val accuracy."""
    return accuracy.index(max(accuracy))


def best_accuracy_last(accuracy: list[float], _loss: list[float], _images: int) -> int:
    best = max(accuracy)
    return max(index for index, value in enumerate(accuracy) if value == best)


def within_one_image_then_loss(accuracy: list[float], loss: list[float], images: int) -> int:
    """Epochs within one val image of the best accuracy count as tied; of them the lowest val loss."""
    floor = max(accuracy) - 1.0 / images - 1e-6
    return min((index for index, value in enumerate(accuracy) if value >= floor), key=lambda index: loss[index])


def last_epoch(accuracy: list[float], _loss: list[float], _images: int) -> int:
    return len(accuracy) - 1


RULES: dict[str, Rule] = {
    "best val accuracy, ties by val loss (thaw today)": best_accuracy_then_loss,
    "lowest val loss": lowest_loss,
    "best val accuracy within one val image, then val loss": within_one_image_then_loss,
    "best val accuracy, first of ties (hand loop, fastai)": best_accuracy_first,
    "best val accuracy, last of ties": best_accuracy_last,
    "the last epoch": last_epoch,
}


def val_images(accuracies: list[float]) -> int:
    """The val split's size, from its accuracies (rounded to 4 places): the smallest count they are all fractions of."""
    for count in range(1, 5000):
        if all(abs(value * count - round(value * count)) <= 0.00005 * count + 1e-9 for value in accuracies):
            if len({round(value * count) for value in accuracies}) == len(set(accuracies)):
                return count
    raise SystemExit(f"no val size fits the accuracies {accuracies}")


def read_runs(paths: list[Path]) -> list[dict]:
    runs = []
    for path in paths:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith("{"):
                row = json.loads(line)
                if "test_history" in row:
                    runs.append(row)
    if not runs:
        raise SystemExit("no run with test_history: run benchmarks/recipes.py with --test-every-epoch")
    return runs


def table(runs: list[dict], images_of: dict[str, int]) -> str:
    groups = {}
    for run in runs:
        groups.setdefault((run["set"], run.get("model", "mobilenet_v2"), run["recipe"]), []).append(run)
    lines = [
        "| rule | " + " | ".join(f"{name} ({model}, {recipe}, {len(group)} seeds)" for (name, model, recipe), group in groups.items()) + " | mean over the sets |",
        "|---|" + "---|" * (len(groups) + 1),
    ]
    picks: dict[str, Callable[[dict], int]] = {name: _picker(rule, images_of) for name, rule in RULES.items()}
    picks["(hindsight: the epoch test likes best; no rule can see it)"] = lambda run: max(range(len(run["test_history"])), key=lambda i: run["test_history"][i])
    for name, pick in picks.items():
        cells, means = [], []
        for group in groups.values():
            scores = [run["test_history"][pick(run)] for run in group]
            means.append(statistics.mean(scores))
            cells.append(f"{means[-1]:.4f} (spread {max(scores) - min(scores):.4f})")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {statistics.mean(means):.4f} |")
    return "\n".join(lines) + "\n"


def _picker(rule: Rule, images_of: dict[str, int]) -> Callable[[dict], int]:
    return lambda run: rule(run["val_history"], run["val_loss_history"], images_of[run["set"]])


def check_replay(runs: list[dict]) -> None:
    """thaw's own choice, replayed from the history, must be the epoch the run delivered (else the history lies)."""
    for run in runs:
        chosen = best_accuracy_then_loss(run["val_history"], run["val_loss_history"], 1) + 1
        if chosen != run["delivered_epoch"] or abs(run["test_history"][chosen - 1] - run["test_accuracy"]) > 1e-4:
            raise SystemExit(f"{run['set']} seed {run['seed']}: replayed epoch {chosen} is not the delivered {run['delivered_epoch']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="JSON lines of benchmarks/recipes.py --test-every-epoch")
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    runs = read_runs(args.runs)
    check_replay(runs)
    images_of = {name: val_images([value for run in runs if run["set"] == name for value in run["val_history"]]) for name in {r["set"] for r in runs}}
    text = "val images: " + ", ".join(f"{name} {count}" for name, count in sorted(images_of.items())) + "\n\n" + table(runs, images_of)
    print(text)
    if args.markdown:
        args.markdown.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
