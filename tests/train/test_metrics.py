"""Macro-F1 as scikit-learn's f1_score(average="macro") gives it: over the classes held or predicted."""

from __future__ import annotations

import pytest
import torch

from thaw.train.metrics import MetricTracker


def _tracker(true: list[int], predicted: list[int], classes: int = 4) -> MetricTracker:
    tracker = MetricTracker(classes)
    tracker.update(torch.nn.functional.one_hot(torch.tensor(predicted), classes).float(), torch.tensor(true), loss=0.0)
    return tracker


def test_macro_f1_averages_the_classes_held_or_predicted() -> None:
    # class 0: 2 of 3 right, predicted twice (P 1, R 2/3, F1 0.8); class 1: 1 of 2, predicted twice (F1 0.5);
    # class 2: held by no sample but predicted once (F1 0, counted); class 3: neither held nor predicted (left out)
    summary = _tracker(true=[0, 0, 0, 1, 1], predicted=[0, 0, 1, 1, 2]).summary()
    assert summary["per_class_f1"] == pytest.approx([0.8, 0.5, 0.0, 0.0])
    assert summary["macro_f1"] == pytest.approx((0.8 + 0.5 + 0.0) / 3)  # over every class it would be 0.325
    assert summary["per_class_support"] == [3, 2, 0, 0] and summary["accuracy"] == pytest.approx(3 / 5)


def test_a_class_held_but_never_predicted_counts_with_f1_zero() -> None:
    summary = _tracker(true=[0, 1, 1], predicted=[0, 0, 0], classes=2).summary()
    assert summary["per_class_f1"] == pytest.approx([0.5, 0.0])
    assert summary["macro_f1"] == pytest.approx(0.25)


def test_nothing_scored_is_zero_not_nan() -> None:
    assert MetricTracker(3).summary()["macro_f1"] == 0.0
