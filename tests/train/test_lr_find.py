"""The lr suggestion: the steepest fall of the smoothed loss, and none where the loss never falls past its noise."""

from __future__ import annotations

import gzip
import random
import warnings
from pathlib import Path

import pytest
from PIL import Image

from thaw.errors import ThawError, WriteError
from thaw.train.lr_find import FLAT_FALL, MARK_WRITERS, MAX_PLOT_BYTES, batch_losses, is_lr_find_plot, plot_lr_find, smoothed_losses, suggest
from thaw.train.plots import plt

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


@pytest.mark.parametrize("kind", sorted(MARK_WRITERS))
def test_a_plot_carries_thaws_mark_and_a_users_file_does_not(kind: str, tmp_path: Path) -> None:
    """What lets `thaw lr-find --out` replace its own plot and refuse anything else of that name."""
    plot = plot_lr_find(LRS, smoothed_losses(falling(0.0, 0)), LRS[50], tmp_path / f"lr.{kind}")
    assert plot == tmp_path / f"lr.{kind}" and is_lr_find_plot(plot)
    assert [path.name for path in tmp_path.iterdir()] == [plot.name]  # written through a temporary file, none left
    figure, axis = plt.subplots()
    axis.plot([1, 2])
    figure.savefig(tmp_path / f"theirs.{kind}")  # matplotlib's own mark, as any other script's plot
    plt.close(figure)
    assert not is_lr_find_plot(tmp_path / f"theirs.{kind}")
    (tmp_path / f"broken.{kind}").write_bytes(b"not a plot at all")
    assert not is_lr_find_plot(tmp_path / f"broken.{kind}")


@pytest.mark.parametrize("kind, metadata", [("svg", {"Title": "thaw lr-find vs my own sweep"}), ("svg", {"Title": "thaw lr-find"}),
                                             ("png", {"Software": "thaw lr-finder-compare 2.0"}), ("pdf", {"Creator": "thaw lr-find, edited"}),
                                             ("ps", {"Creator": "thaw lr-find 2"})])
def test_a_mark_that_only_begins_like_ours_is_not_ours(kind: str, metadata: dict, tmp_path: Path) -> None:
    figure, axis = plt.subplots()
    axis.plot([1, 2])
    figure.savefig(tmp_path / f"mine.{kind}", metadata=metadata)
    plt.close(figure)
    assert not is_lr_find_plot(tmp_path / f"mine.{kind}")


def test_an_earlier_thaws_default_plot_is_ours_by_its_name_alone(tmp_path: Path) -> None:
    """Plots written before the mark: the default lr_find.png (a matplotlib PNG) may be replaced, no other name."""
    for folder, size in (("ours", (6, 4)), ("fastai", (6.4, 4.8))):  # lr-find's figure; matplotlib's default one
        (tmp_path / folder).mkdir()
        figure, axis = plt.subplots(figsize=size)
        axis.plot([1, 2])
        for name in ("lr_find.png", "holiday.png"):
            figure.savefig(tmp_path / folder / name, dpi=100)
        plt.close(figure)
    (tmp_path / "photo").mkdir()
    Image.new("RGB", (600, 400)).save(tmp_path / "photo" / "lr_find.png")
    assert is_lr_find_plot(tmp_path / "ours" / "lr_find.png") and not is_lr_find_plot(tmp_path / "ours" / "holiday.png")
    assert not is_lr_find_plot(tmp_path / "fastai" / "lr_find.png")  # another tool's plot of that name, 640x480
    assert not is_lr_find_plot(tmp_path / "photo" / "lr_find.png")  # a picture of that name, made by no matplotlib


def test_a_plot_without_a_suffix_is_a_png_and_formats_without_metadata_are_never_ours(tmp_path: Path) -> None:
    plot = plot_lr_find(LRS, smoothed_losses(falling(0.0, 0)), None, tmp_path / "lr")
    assert plot == tmp_path / "lr.png" and is_lr_find_plot(plot)
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.info["Software"] == "thaw lr-find"
    webp = plot_lr_find(LRS, smoothed_losses(falling(0.0, 0)), None, tmp_path / "lr.webp")
    assert not is_lr_find_plot(webp)  # a WebP keeps no maker's name that thaw writes: it cannot tell it from a photo
    svg = plot_lr_find(LRS, smoothed_losses(falling(0.0, 0)), None, tmp_path / "lr.svg")
    (tmp_path / "wrapped.svgz").write_bytes(gzip.compress(svg.read_bytes()))  # gzip's own, not matplotlib's
    assert is_lr_find_plot(tmp_path / "wrapped.svgz")


def test_a_damaged_or_inflating_svgz_is_not_ours_and_no_traceback(tmp_path: Path) -> None:
    packed = bytearray(gzip.compress(b"<svg>" + b"x" * 5000 + b"<dc:title>thaw lr-find</dc:title>"))
    packed[10:30] = b"\xff" * 20  # a valid gzip header, then a deflate stream that is not
    (tmp_path / "broken.svgz").write_bytes(bytes(packed))
    assert not is_lr_find_plot(tmp_path / "broken.svgz")
    bomb = gzip.compress(b" " * (MAX_PLOT_BYTES + 1) + b"<dc:title>thaw lr-find</dc:title>")  # its mark past the cap
    (tmp_path / "bomb.svgz").write_bytes(bomb)
    assert len(bomb) < MAX_PLOT_BYTES and not is_lr_find_plot(tmp_path / "bomb.svgz")


def test_a_plot_that_cannot_be_written_leaves_the_earlier_one_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plot = plot_lr_find(LRS, smoothed_losses(falling(0.0, 0)), LRS[50], tmp_path / "lr.png")
    before = plot.read_bytes()

    def disk_full(self, target, **kwargs):
        Path(target).write_bytes(b"half a plot")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plt.Figure, "savefig", disk_full)
    with pytest.raises(WriteError, match="No space left on device; the previous file is intact"):
        plot_lr_find(LRS, smoothed_losses(falling(0.0, 1)), LRS[40], plot)
    assert plot.read_bytes() == before and [path.name for path in tmp_path.iterdir()] == ["lr.png"]


def test_our_plot_inside_a_users_document_does_not_make_it_ours(tmp_path: Path) -> None:
    """A poster that embeds our SVG, a PostScript thesis that includes our EPS, a PDF whose one Creator is another's."""
    svg = plot_lr_find(LRS, smoothed_losses(falling(0.0, 0)), None, tmp_path / "lr.svg").read_bytes()
    (tmp_path / "poster.svg").write_bytes(b'<svg xmlns="http://www.w3.org/2000/svg"><g id="poster"><text>my poster</text></g>' + svg + b"</svg>")
    eps = plot_lr_find(LRS, smoothed_losses(falling(0.0, 0)), None, tmp_path / "lr.eps").read_bytes()
    (tmp_path / "thesis.ps").write_bytes(b"%!PS-Adobe-3.0\n%%Creator: dvips(k)\n%%EndComments\n%%BeginDocument: lr.eps\n" + eps + b"%%EndDocument\n")
    (tmp_path / "notes.pdf").write_bytes(b"%PDF-1.7\n% /Creator (thaw lr-find)\n1 0 obj << /Creator (LibreOffice) >> endobj\n%%EOF\n")
    for name in ("poster.svg", "thesis.ps", "notes.pdf"):
        assert not is_lr_find_plot(tmp_path / name), name
    assert is_lr_find_plot(tmp_path / "lr.svg") and is_lr_find_plot(tmp_path / "lr.eps")


def test_a_damaged_raster_is_refused_without_pils_own_lines(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """A PNG whose header claims 10000x10000 pixels: PIL's DecompressionBombWarning reached the screen before the refusal."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 10000, 10000, 8, 2, 0, 0, 0)
    (tmp_path / "huge.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    with warnings.catch_warnings(record=True) as shown:  # pytest would otherwise collect them, unseen
        warnings.simplefilter("always")
        assert not is_lr_find_plot(tmp_path / "huge.png")
    said = capfd.readouterr()
    assert shown == [] and said.err == "" and said.out == ""


def _pooled_batchnorm_net():
    """BatchNorm after the pooling: one value per channel in a batch of one image, which torch refuses in train mode."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.BatchNorm1d(8), nn.Linear(8, 4),
    )


def test_a_last_batch_of_one_image_is_left_out_where_batchnorm_trains(tmp_path: Path) -> None:
    """17 images in batches of 16 ended in torch's 'Expected more than 1 value per channel' traceback."""
    from tests.conftest import write_class_images
    from thaw import adapt
    from thaw.data.folders import discover
    from thaw.train import TrainConfig
    from thaw.train.lr_find import lr_range_test

    data = discover(write_class_images(tmp_path / "data", classes=("a", "b"), per_class=4, size=16), val_split=0.25)
    assert len(data.train) == 6
    config = TrainConfig(batch_size=5, image_size=16, quiet=True, precision="fp32")  # batches of 5 and 1
    lrs, _ = lr_range_test(adapt(_pooled_batchnorm_net(), num_classes=2), data, train=("all",), steps=6, config=config)
    assert len(lrs) == 6
    lrs, _ = lr_range_test(adapt(_pooled_batchnorm_net(), num_classes=2), data, train=("head",), steps=6, config=config)
    assert len(lrs) == 6  # frozen BatchNorm: its batch of one trains the head
    with pytest.raises(ThawError, match=r"lr-find: BatchNorm layers that train use batch statistics, which one image per batch does not have; use --batch-size 2"):
        lr_range_test(adapt(_pooled_batchnorm_net(), num_classes=2), data, train=("all",), steps=6, config=TrainConfig(batch_size=1, image_size=16))
    one_each = discover(write_class_images(tmp_path / "one", classes=("a", "b"), per_class=2, size=16), val_split=0.5)
    assert len(one_each.train) == 2  # one batch of the 2 files, which decodes one image: the other file is no image
    for path, _ in one_each.train[:1]:
        path.write_bytes(b"not an image any more")
    with pytest.raises(ThawError, match=r"lr-find: every batch that decoded held one image, which BatchNorm layers that train cannot use"):
        lr_range_test(adapt(_pooled_batchnorm_net(), num_classes=2), one_each, train=("all",), steps=6, config=config)
