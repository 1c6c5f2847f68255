"""The lr suggestion: the steepest fall of the smoothed loss, and none where the loss never falls."""

from __future__ import annotations

import pytest

from thaw.errors import ThawError
from thaw.train.lr_find import FLAT_FALL, suggest

LRS = [10 ** (-7 + index * 0.5) for index in range(15)]


def test_the_suggestion_is_where_the_loss_falls_fastest_before_its_minimum() -> None:
    losses = [2.0, 1.99, 1.95, 1.6, 1.0, 0.9, 0.85, 0.8, 0.82, 1.0, 1.5, 3.0, 6.0, 9.0, 12.0]
    assert suggest(LRS, losses) == LRS[4]  # 1.6 -> 1.0, the largest drop; the rise past the minimum is not looked at


@pytest.mark.parametrize(
    "losses",
    [
        [0.693] * 15,  # flat: nothing learnt
        [0.693 + 0.001 * ((-1) ** index) for index in range(15)],  # flat with noise, whose steepest step is a jitter
        [0.7 + 0.05 * index for index in range(15)],  # rising from the first step
        [1.0 - (FLAT_FALL * 0.9) * index / 14 for index in range(15)],  # falls, but by less than FLAT_FALL of its start
    ],
)
def test_a_loss_that_never_falls_by_flat_fall_gets_no_suggestion(losses: list[float]) -> None:
    assert suggest(LRS, losses) is None


def test_a_fall_of_flat_fall_or_more_gets_one() -> None:
    losses = [1.0 - (FLAT_FALL * 1.2) * index / 14 for index in range(15)]
    assert suggest(LRS, losses) in LRS


def test_too_few_steps_are_one_line() -> None:
    with pytest.raises(ThawError, match="too few steps"):
        suggest(LRS[:4], [1.0, 0.9, 0.8, 0.7])


def test_a_first_batch_below_the_curve_does_not_hide_its_fall() -> None:
    """The first smoothed value is one batch's loss: a lucky batch below the curve made a real fall look like none."""
    losses = [0.45, 1.0, 1.0, 0.99, 0.98, 0.9, 0.8, 0.5, 0.45, 0.44, 0.6, 1.0, 2.0, 3.0, 4.0]
    assert suggest(LRS, losses) == LRS[7]  # 0.8 -> 0.5; measured from 0.45, the fall to 0.44 was "no fall"
