"""Pictures of a run: learning curves with stage boundaries, and the confusion matrix."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import font_manager  # noqa: E402
from matplotlib.ft2font import FT2Font  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


@lru_cache(maxsize=1)
def _plot_font() -> FT2Font:
    return FT2Font(font_manager.findfont(font_manager.FontProperties()))


def drawable(name: str) -> str:
    """`name` as the plot font can draw it: where the font lacks a character (CJK or emoji class names, with only
    DejaVu Sans installed), the name is written with escapes (\\u732b): matplotlib drew every such character as the
    same empty box, so two classes' labels looked alike, and warned once per character."""
    # a space draws as one; other blanks (a tab) the font has no glyph for, and matplotlib warned of each
    if all(character == " " or _plot_font().get_char_index(ord(character)) for character in name):
        return name
    return ascii(name)[1:-1]


def plot_curves(history: list[dict], path: Path) -> Path:
    epochs = [row["epoch"] for row in history]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(11, 4))
    loss_axis.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    loss_axis.plot(epochs, [r["val_loss"] for r in history], "o-", label="val")
    accuracy_axis.plot(epochs, [r["train_accuracy"] for r in history], "o-", label="train")
    accuracy_axis.plot(epochs, [r["val_accuracy"] for r in history], "o-", label="val")
    for previous, row in zip(history, history[1:]):
        if row["stage_index"] != previous["stage_index"]:
            for axis in (loss_axis, accuracy_axis):
                axis.axvline(row["epoch"] - 0.5, color="grey", linestyle="--")
                axis.text(row["epoch"] - 0.45, axis.get_ylim()[1], drawable(row["stage"]), va="top", fontsize=8, color="grey")
    for axis, title in ((loss_axis, "loss"), (accuracy_axis, "accuracy")):
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_title(title)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_confusion(confusion: list[list[int]], classes: list[str], path: Path, title: str = "confusion matrix") -> Path:
    figure = confusion_figure(confusion, classes, title)
    try:
        figure.savefig(path, dpi=100)
    finally:  # a folder it cannot write to (evaluate goes on): the figure is not kept open
        plt.close(figure)
    return path


def confusion_figure(confusion: list[list[int]], classes: list[str], title: str = "confusion matrix") -> plt.Figure:
    """The matrix with its counts; the caller saves or logs it (TensorBoard's add_figure closes it)."""
    size = max(4.0, 0.5 * len(classes) + 2)
    figure, axis = plt.subplots(figsize=(size, size))
    axis.imshow(confusion, cmap="Blues")
    labels = [drawable(name) for name in classes]
    axis.set_xticks(range(len(classes)), labels, rotation=45, ha="right")
    axis.set_yticks(range(len(classes)), labels)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    peak = max((max(row) for row in confusion), default=0)
    for i, row in enumerate(confusion):
        for j, count in enumerate(row):
            axis.text(j, i, str(count), ha="center", va="center", color="white" if count > peak / 2 else "black")
    axis.set_title(title)
    figure.tight_layout()
    return figure
