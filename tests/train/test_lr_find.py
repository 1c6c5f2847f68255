"""The lr suggestion: the steepest fall of the smoothed loss, and none where the loss never falls past its noise."""

from __future__ import annotations

import gzip
import random
from pathlib import Path

import pytest
from PIL import Image

from thaw.errors import ThawError
from thaw.train.lr_find import FLAT_FALL, MAKER_FIELDS, batch_losses, is_lr_find_plot, plot_lr_find, smoothed_losses, suggest

LRS = [1e-7 * 1e7 ** (index / 99) for index in range(100)]


def falling(noise: float, seed: int) -> list[float]:
    """Batch losses flat at 0.7, falling to 0.2 from step 40 to 60, flat, then exploding from step 80."""
    rng = random.Random(seed)
    level = [0.7 if i < 40 else max(0.2, 0.7 - 0.025 * (i - 40)) if i < 80 else 0.2 + 0.2 * (i - 80) for i in range(100)]
    return [value + rng.gauss(0, noise) for value in level]


def test_the_curve_is_undone_into_its_batch_losses() -> None:
    batch = [0.7, 1.3, 0.2, 0.9, 0.4]
    assert batch_losses(smoothed_losses(batch)) == pytest.approx(batch)


def test_the_suggestion_is_on_the_fall_before_the_minimum() -> None:
    suggestion = suggest(LRS, smoothed_losses(falling(0.0, 0)))
    assert LRS[40] <= suggestion <= LRS[60]  # where the loss falls; the explosion past step 80 is not looked at


@pytest.mark.parametrize(
    "batch",
    [
        [0.693] * 100,  # flat: nothing learnt
        [0.7 + 0.005 * index for index in range(100)],  # rising from the first step
        [1.0 - (FLAT_FALL * 0.8) * index / 99 for index in range(100)],  # falls, but by less than FLAT_FALL of its start
    ],
    ids=["flat", "rising", "small-fall"],
)
def test_a_loss_that_never_falls_gets_no_suggestion(batch: list[float]) -> None:
    assert suggest(LRS, smoothed_losses(batch)) is None


@pytest.mark.parametrize("noise", [0.05, 0.1, 0.2])
def test_a_flat_curve_with_batch_noise_seldom_gets_one(noise: float) -> None:
    """Its lowest point lies below its level by noise alone: measured from the first batch, or by 5% alone, half of
    such curves got an lr (the review's simulation); here at most 3 of 100 do."""
    suggested = 0
    for seed in range(100):
        rng = random.Random(seed)
        suggested += suggest(LRS, smoothed_losses([1.0 + rng.gauss(0, noise) for _ in range(100)])) is not None
    assert suggested <= 3


def test_a_real_fall_in_batch_noise_gets_one() -> None:
    suggestions = [suggest(LRS, smoothed_losses(falling(noise, seed))) for noise in (0.05, 0.1) for seed in range(20)]
    assert None not in suggestions
    # At a noise of 0.05 the steepest step is on the fall; at 0.1 a step of noise may be steeper (as in any such rule).
    assert all(LRS[30] <= suggestion <= LRS[70] for suggestion in suggestions[:20])


def test_too_few_steps_are_one_line() -> None:
    with pytest.raises(ThawError, match="too few steps"):
        suggest(LRS[:4], [1.0, 0.9, 0.8, 0.7])


@pytest.mark.parametrize("kind", sorted(MAKER_FIELDS))
def test_a_plot_carries_thaws_mark_and_a_users_file_does_not(kind: str, tmp_path: Path) -> None:
    """What lets `thaw lr-find --out` replace its own plot and refuse anything else of that name."""
    plot = plot_lr_find(LRS, smoothed_losses(falling(0.0, 0)), LRS[50], tmp_path / f"lr.{kind}")
    assert plot == tmp_path / f"lr.{kind}" and is_lr_find_plot(plot)
    assert [path.name for path in tmp_path.iterdir()] == [plot.name]  # written through a temporary file, none left
    from thaw.train.plots import plt

    figure, axis = plt.subplots()
    axis.plot([1, 2])
    figure.savefig(tmp_path / f"theirs.{kind}")  # matplotlib's own mark, as any other script's plot
    plt.close(figure)
    assert not is_lr_find_plot(tmp_path / f"theirs.{kind}")
    (tmp_path / f"broken.{kind}").write_bytes(b"not a plot at all")
    assert not is_lr_find_plot(tmp_path / f"broken.{kind}")


def test_a_plot_without_a_suffix_is_a_png_and_formats_without_metadata_are_never_ours(tmp_path: Path) -> None:
    plot = plot_lr_find(LRS, smoothed_losses(falling(0.0, 0)), None, tmp_path / "lr")
    assert plot == tmp_path / "lr.png" and is_lr_find_plot(plot)
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.text["Software"] == "thaw lr-find"
    jpeg = plot_lr_find(LRS, smoothed_losses(falling(0.0, 0)), None, tmp_path / "lr.jpg")
    assert not is_lr_find_plot(jpeg)  # a JPEG keeps no maker's name: thaw cannot tell it from a photo
    (tmp_path / "wrapped.svgz").write_bytes(gzip.compress(b"<dc:title>thaw lr-find</dc:title>"))
    assert is_lr_find_plot(tmp_path / "wrapped.svgz")
