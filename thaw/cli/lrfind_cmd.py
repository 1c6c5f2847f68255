"""`thaw lr-find DATA --model M`: the lr range test, a plot, and a suggested lr."""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from pathlib import Path

import torch

from thaw._io import missing_folders, names_a_folder, remove_made_folders
from thaw.cli.options import add_model_options, checked_batch_size, checked_lr, path_text, positive_int
from thaw.data.folders import describe_skipped, discover, file_would_be_read
from thaw.data.manifest_check import check_image_table
from thaw.errors import ThawError, WriteError
from thaw.models import build_model
from thaw.train.config import TrainConfig, check_image_size
from thaw.train.fit import effective_preprocessing
from thaw.train.lr_find import DEFAULT_PLOT, MARK_WRITERS, is_lr_find_plot, lr_range_test, plot_lr_find, suggest
from thaw.train.run_folder import EVALUATE_PLOTS, holds_run, is_run_file

MAX_STEPS = 10_000  # the lr moves start -> end over the steps: beyond this it barely moves per step


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("lr-find", help="lr range test: plot loss against lr and suggest one")
    parser.add_argument("data", type=path_text)
    add_model_options(parser, text=False)  # lr-find runs on images
    parser.set_defaults(weights="DEFAULT")
    parser.add_argument("--train", nargs="+", default=["head"], help="selectors that train during the test (default: head)")
    parser.add_argument("--start", type=positive_lr, default=1e-7)
    parser.add_argument("--end", type=positive_lr, default=1.0)
    parser.add_argument("--steps", type=steps, default=100)
    parser.add_argument("--batch-size", type=checked_batch_size, default=32)
    parser.add_argument(
        "--image-size", type=positive_int,
        help="override the weights' input size, as thaw train --image-size does (test at the size you will train at)",
    )
    parser.add_argument("--out", type=path_text, default=DEFAULT_PLOT, help="where to write the plot (.png, .svg, .pdf)")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(handler=run)


def positive_lr(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an lr like 1e-7, got {text!r}") from None
    return checked_lr(value, text)


def steps(text: str) -> int:
    value = positive_int(text)
    if value > MAX_STEPS:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_STEPS:,} steps (100 is usual), got {text}")
    return value


def plot_path(text: str, data: Path) -> Path:
    """Where the plot goes, checked before the test runs: a file matplotlib can write, in a folder that exists, where
    it harms nothing."""
    from matplotlib.backend_bases import FigureCanvasBase

    path = Path(text)
    if path.is_dir() or names_a_folder(text):  # Path() drops a last / or /.: plots/ would have become a file "plots"
        raise ThawError(f"--out {text} names a folder; name the plot file, like {path / 'lr_find.png'}")
    if text == "-":  # matplotlib would write a file "-.png"
        raise ThawError("--out - : the plot is written to a file, not to standard output; name it, like lr_find.png")
    if not path.suffix:  # matplotlib would add .png itself; say the name it really writes
        path = path.with_name(path.name + ".png")
    if path.suffix[1:].lower() not in FigureCanvasBase.get_supported_filetypes():
        raise ThawError(f"--out {text}: cannot draw a {path.suffix} file; name it .png, .svg or .pdf")
    check_plot_harms_nothing(path, data)  # before its folder is made: a new folder in the data would be a class
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # the errno's own words, "File exists", named neither what is there nor the remedy
        raise ThawError(
            f"cannot create the folder of --out {text}: {path.parent} is there and is no folder (a file, or a link that "
            "leads to none); choose another --out"
        ) from None
    except OSError as error:
        raise ThawError(f"cannot create the folder of --out {text} ({error.strerror}); choose another --out") from None
    return path


def check_plot_harms_nothing(out: Path, data: Path) -> None:
    """The plot must not become an image of the data it tests (the next run would train on it, or lose the image it
    replaced), nor make a folder there (a class of no images), nor replace a file of a run (its curves.png, say)."""
    if file_would_be_read(data, out):
        raise ThawError(f"--out {out} is inside the data folder {data}: the plot would be read as an image of it; put it elsewhere")
    if is_run_file(out) or (holds_run(out.parent) and fnmatch.fnmatch(out.name.lower(), EVALUATE_PLOTS)):
        raise ThawError(f"--out {out} is a file of the run in {out.parent}; name another file")
    if out.exists() and not out.is_file():  # a pipe: matplotlib's error would say (None)
        raise ThawError(f"--out {out} is not a regular file (a device or a pipe); name a plot file")


def check_plot_replaceable(out: Path) -> None:
    """A file already at --out is replaced only if it is an earlier plot of ours: a photo, a thesis.pdf would be lost."""
    if out.is_file() and not is_lr_find_plot(out):
        raise ThawError(f"--out {out} exists and {_not_ours(out)}; name another file, or remove it first")


def _not_ours(out: Path) -> str:
    if out.suffix[1:].lower() in MARK_WRITERS:
        return f"carries no mark of thaw lr-find (a plot from a thaw before the mark carries none, except a {DEFAULT_PLOT})"
    return f"a {out.suffix} file keeps no mark thaw writes, so thaw cannot tell its plot from yours (a .png, .pdf, .svg or .jpg plot can be replaced)"


def warn_skipped(skipped: tuple[tuple[str, str], ...]) -> None:
    """Unreadable files are left out of the test, with a warning on stderr (stdout carries the result, or its JSON)."""
    if skipped:
        print(f"thaw: warning: {describe_skipped(skipped)}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    made = missing_folders(Path(args.out).parent)  # plot_path makes them; a test that fails leaves none behind
    try:
        return _find_lr(args, plot_path(args.out, Path(args.data)))
    except BaseException:
        remove_made_folders(made)
        raise


def _find_lr(args: argparse.Namespace, out: Path) -> int:
    check_image_table(args.data, "thaw lr-find runs on images")
    data = discover(args.data)
    listed = Path(args.data).is_file() and any(path.resolve() == out.resolve() for path, _ in data.everything())
    if listed:  # a manifest's image, wherever it lies (a folder's images: checked above, without a pass over them)
        raise ThawError(f"--out {out} is an image of the data {args.data}; put the plot elsewhere")
    check_plot_replaceable(out)  # after the checks that say more (an image of the data, a run's file)
    warn_skipped(data.skipped)  # before the test, as train says it: the user can stop and fix the files
    torch.manual_seed(0)
    adapter = build_model(args.model, weights=args.weights, num_classes=len(data.classes))
    config = TrainConfig(batch_size=args.batch_size, image_size=args.image_size, quiet=True)
    check_image_size(adapter, config, args.model)  # before any image is decoded
    undecodable: list[tuple[str, str]] = []
    try:
        lrs, losses = lr_range_test(
            adapter, data, train=tuple(args.train), start=args.start, end=args.end, steps=args.steps, config=config, undecodable=undecodable
        )
    finally:  # where no image decoded too: the error says so, the warning names the files
        warn_skipped(tuple(undecodable))
    suggestion = suggest(lrs, losses)
    try:
        picture = plot_lr_find(lrs, losses, suggestion, out)
    except WriteError as error:
        raise ThawError(f"{error}; choose another --out") from None
    if args.json:
        size = effective_preprocessing(adapter, config).crop_size  # the size it ran at
        print(json.dumps({"suggested_lr": suggestion, "plot": str(picture), "image_size": size, "lrs": lrs, "losses": losses}))
    elif suggestion is None:  # a flat or rising curve: its steepest step would be noise
        lowest = min(losses)
        print(
            f"no lr suggested: the loss did not fall over the range (from {losses[0]:.3f}, lowest {lowest:.3f}); plot: {picture}. "
            "Try a wider range (--start, --end), more --steps, or check the labels"
        )
    else:
        print(f"suggested lr {suggestion:.2e} (steepest fall of the loss); plot: {picture}")
    return 0
