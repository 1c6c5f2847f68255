"""Commands that use a finished run: evaluate, predict, export."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from thaw.cli.options import add_table_columns, path_text, positive_int, scored_columns_and_split
from thaw._io import answers, lies_within, names_a_folder, on_one_line, special_file
from thaw.data.folders import describe_skipped, file_would_be_read
from thaw.data.images import IMAGE_SUFFIXES
from thaw.errors import ThawError, WriteError
from thaw.export.formats import FORMATS, ExportCheck, check_replaceable, export_description, export_model
from thaw.export.inference import check_images, image_files, predict_files, predict_texts, run_precision, score_run, with_tta
from thaw.export.report import other_data_name, run_data_path, save_report
from thaw.train.metrics import undefined_as_null
from thaw.train.plots import plot_confusion
from thaw.train.run_folder import ONNX_EXPORT, RUN_FOLDERS, TORCHSCRIPT_EXPORT, holds_run, is_run_file
from thaw.export.run_dir import load_run, recorded_data_path
from thaw.plan.report import render_table


TOP_K = 3  # classes per prediction in --json, and on an image's plain line
TTA_HELP = "test-time augmentation: average the softmax over each image and its mirror image (a second forward per image)"


def register(commands: argparse._SubParsersAction) -> None:
    # intermixed: DATA is optional, and argparse gives an optional positional nothing once an option has come
    evaluate = commands.add_parser("evaluate", help="accuracy, macro-F1, per-class accuracy and confusion matrix of a run", intermixed=True)
    evaluate.add_argument("run")
    evaluate.add_argument("data", nargs="?", type=path_text, help="images or a text table to score (default: the run's own data, as recorded)")
    evaluate.add_argument(
        "--split", choices=("train", "val", "test"),
        help="data in split folders, or no DATA: which split (default val); other data is scored whole unless a split of "
        "the run's is named",
    )
    evaluate.add_argument("--json", action="store_true")
    evaluate.add_argument("--tta", action="store_true", help=TTA_HELP)
    evaluate.add_argument("--report", action="store_true", help="also write RUN/report.html for this split (thaw report)")
    add_table_columns(evaluate, scored_whole=True)
    evaluate.set_defaults(handler=run_evaluate)

    predict = commands.add_parser(
        "predict", help="class names and probabilities for image files or folders, or for texts", intermixed=True
    )
    predict.add_argument("run", type=path_text)
    predict.add_argument("paths", nargs="*", help="image files or folders; for a text run, the texts themselves")
    predict.add_argument("--file", help="text runs: a file with one text per line (- for standard input)")
    predict.add_argument(
        "--top-k", type=positive_int,
        help=f"how many classes to show per image or text (default {TOP_K}; a text's plain line shows the top one unless given)",
    )
    predict.add_argument("--json", action="store_true")
    predict.add_argument("--tta", action="store_true", help=TTA_HELP)
    predict.set_defaults(handler=run_predict)

    export = commands.add_parser("export", help="export a run to ONNX or TorchScript, verified against PyTorch")
    export.add_argument("run")
    export.add_argument("--format", choices=FORMATS, default="onnx")
    export.add_argument("--output", help="file to write (default RUN/model.onnx or RUN/model.pt)")
    export.set_defaults(handler=run_export)


def run_evaluate(args: argparse.Namespace) -> int:
    adapter, meta = load_run(args.run)
    columns, split = scored_columns_and_split(args)
    data = run_data_path(Path(args.run), meta, args.data, "evaluate")
    scored = score_run(adapter, meta, data, split, tta=args.tta, columns=columns)
    metrics, split = scored.metrics, scored.metrics["split"]
    warn_if_training_data(meta, args.data, split)
    report, problem = None, None
    try:  # the scores are printed whatever the run folder takes: it may be read-only
        report = save_report(Path(args.run), adapter, meta, scored, data=args.data)[0] if args.report else None
    except WriteError as error:  # a read-only run folder: the report line that writes the page elsewhere
        problem = f"{error}; write the page elsewhere: {_report_elsewhere(args, split)}"
    except ThawError as error:
        problem = str(error)
    picture_path = Path(args.run) / _confusion_name(split, args.tta, other_data_name(args.data, meta))
    picture = _confusion_picture(metrics, picture_path, f"{split} split")
    if args.json:
        extra = {"confusion_png": str(picture) if picture else None} | ({"report": str(report)} if report else {})
        print(json.dumps({k: v for k, v in undefined_as_null(metrics).items() if k != "seconds"} | extra))
        return _said_problem(problem)
    unit = "texts" if meta.get("task") == "text" else "images"
    what = f"every readable one in {data}" if split == "all" else f"the {split} split of {data}"
    top5 = f", top-5 {metrics['top5']:.4f}" if "top5" in metrics else ""
    what += ", averaged with mirror images (--tta)" if args.tta else ""
    if metrics["skipped_files"]:  # named, as training and predict name them
        warn_scored_skipped(scored.skipped, meta.get("task") == "text")
    print(f"{split}: {metrics['count']} {unit} ({what}), accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}{top5}")
    # A class the scored data does not hold (a held-out set of some classes) has no recall, and no F1 unless the model
    # predicts it: "-", not 0, as macro-F1 leaves it out; the same rule as --json's nulls.
    defined = undefined_as_null(metrics)
    columns = zip(metrics["classes"], defined["per_class_accuracy"], defined["per_class_f1"], metrics["confusion"])
    shown = lambda value: "-" if value is None else f"{value:.3f}"  # noqa: E731
    rows = [[name, shown(acc), shown(f1), *map(str, counts)] for name, acc, f1, counts in columns]
    print(render_table(rows, ["class", "recall", "F1", *[f"->{c}" for c in metrics["classes"]]]))
    if picture:
        print(f"confusion matrix: {picture}")
    if report:
        print(f"report: {report}")
    return _said_problem(problem)


def warn_scored_skipped(skipped: tuple[tuple[str, str], ...], text: bool) -> None:
    """Files (or rows of a text table) of what evaluate or report scored that did not read: named on stderr."""
    print(f"thaw: warning: {describe_skipped(skipped, rows=text)} (in what was scored)", file=sys.stderr)


def warn_if_training_data(meta: dict, data: str | None, split: str) -> None:
    """DATA that is the run's own data, scored whole: its training samples are among those scored, so the accuracy
    is no held-out figure. Said on stderr; the scores follow, as the user may want the training fit."""
    recorded = recorded_data_path(meta)
    if data is None or split != "all" or not recorded or not _same_place(data, recorded):
        return
    unit = "rows" if meta.get("task") == "text" else "images"
    print(
        f"thaw: warning: {data} is the data this run trained on, scored whole: its training {unit} are among those "
        f"scored, so the accuracy is no held-out figure; pass held-out data, or omit DATA to score the run's val split "
        "(which the data as the run trained on rebuilds)",
        file=sys.stderr, flush=True,
    )


def _same_place(path: str, other: str) -> bool:
    try:
        return Path(path).resolve() == Path(other).resolve()
    except (OSError, RuntimeError, ValueError):  # a loop of links, a NUL: not the same place as far as can be told
        return False


def _report_elsewhere(args: argparse.Namespace, split: str) -> str:
    """The `thaw report` line that writes the same page to a file of the user's choosing."""
    data = f" {shlex.quote(str(args.data))}" if args.data else ""
    chosen = f" --split {split}" if split != "all" else ""
    return f"thaw report {shlex.quote(str(args.run))}{data}{chosen} --output FILE.html"


def _confusion_name(split: str, tta: bool, other_data: str | None) -> str:
    """confusion-SPLIT[-tta][--DATA].png: the plain scores' picture stays beside the TTA one, and the run's own
    split's picture beside that of other data scored with the same split name (it was written over). DATA comes
    last, after the one `--` of the name, so no name of data can spell the run's own picture (a folder `tta`)."""
    return f"confusion-{split}{'-tta' if tta else ''}{f'--{other_data}' if other_data else ''}.png"


def _confusion_picture(metrics: dict, path: Path, title: str) -> Path | None:
    """The confusion matrix drawn into the run folder; where it cannot be written, a warning, and the scores follow."""
    try:
        return plot_confusion(metrics["confusion"], metrics["classes"], path, title)
    except OSError as error:
        print(f"thaw: warning: could not write the confusion matrix {path} ({error.strerror or error}); the scores follow", file=sys.stderr)
        return None


def _said_problem(problem: str | None) -> int:
    """The report that could not be written, said after the scores: exit 1, as `thaw train --report` does."""
    if problem is None:
        return 0
    print(f"thaw: error: {problem}", file=sys.stderr)
    return 1


def run_predict(args: argparse.Namespace) -> int:
    adapter, meta = load_run(args.run)
    if meta.get("task") == "text":
        return _predict_texts(args, adapter, meta)
    if args.file:
        raise ThawError("--file is for text runs; for an image run pass image files or folders")
    if not args.paths:
        raise ThawError("give image files or folders to classify")
    if not all(path.strip() for path in args.paths):  # an unset shell variable; it would mean the current folder
        raise ThawError("an empty path names no image; give image files or folders to classify")
    predictions, skipped = predict_files(adapter, meta["classes"], image_files(args.paths), args.top_k or TOP_K, tta=args.tta, precision=run_precision(meta))
    if args.json:
        entries = [{"path": p.path, "predictions": [{"label": l, "probability": v} for l, v in p.labels]} for p in predictions]
        tta = "flip" if args.tta else None  # as evaluate --json records it
        print(json.dumps({"predictions": entries, "skipped": [{"path": p, "reason": r} for p, r in skipped], "tta": tta}))
    else:
        for prediction in predictions:
            print(on_one_line(prediction.path) + ": " + ", ".join(f"{label} {value:.3f}" for label, value in prediction.labels))
        if skipped:
            print(f"thaw: warning: {describe_skipped(tuple(skipped))}", file=sys.stderr)
    return 0


def _read_texts(args: argparse.Namespace) -> list[str]:
    texts = list(args.paths)
    image = next((text for text in texts if Path(text).suffix.lower() in IMAGE_SUFFIXES and answers(Path(text).is_file)), None)
    if image is not None:  # an image run's command given a text run: its file name classified as words, then --file advised
        raise ThawError(f"{image} is an image, and {args.run} is a text run, which classifies texts; predict images with an image run")
    texts_with_names = [text for text in texts if text.strip()]  # Path("") is the working folder: no name was given
    named = next((text for text in texts_with_names if answers(Path(text).is_file)), None)
    if named is not None:  # `thaw predict RUN messages.txt` classifies the words "messages.txt": said, as it may be meant
        print(f"thaw: warning: {named!r} is also a file here; it is classified as a text. To classify the file's lines, pass --file {named}", file=sys.stderr)
    folder = next((text for text in texts_with_names if answers(Path(text).is_dir)), None)
    if folder is not None:  # a folder of images (or of texts) given to a text run: its name is what is classified
        print(f"thaw: warning: {folder!r} is also a folder here; its name is classified as a text, not the files in it", file=sys.stderr)
    if args.file:
        raw = _read_bytes(args.file)
        where = "standard input" if args.file == "-" else args.file
        try:
            lines = raw.decode("utf-8-sig").splitlines()  # -sig: a byte-order mark is not part of the first text
        except UnicodeDecodeError as error:
            raise ThawError(f"{where} is not UTF-8 text (byte {error.start}); pass one UTF-8 text per line") from None
        held = [line for line in lines if line.strip()]
        texts += held
        if len(held) < len(lines) and texts:  # the predictions no longer line up with the file's lines (paste): said
            print(f"thaw: warning: {len(lines) - len(held)} blank line(s) of {where} skipped: one prediction per line that holds a text", file=sys.stderr)
    return texts


def _read_bytes(file: str) -> bytes:
    """The bytes of `--file` (`-`: standard input), or one line saying why they cannot be read."""
    if file == "-":
        stream = getattr(sys.stdin, "buffer", None)
        if stream is None:
            raise ThawError("--file -: there is no standard input to read; pass a file with one text per line")
        return stream.read()
    if Path(file).is_dir():
        raise ThawError(f"{file} is a folder; --file takes a file with one text per line, or - for standard input")
    if not Path(file).exists():
        raise ThawError(f"{file} does not exist; pass a file with one text per line, or - for standard input")
    special = special_file(Path(file))
    if special and special != "a named pipe":  # a pipe (<(...)) is read as standard input is; /dev/zero never ends
        raise ThawError(f"{file} is {special}, not a file; pass a file with one text per line, or - for standard input")
    try:
        return Path(file).read_bytes()
    except OSError as error:
        raise ThawError(f"cannot read {file} ({error.strerror or error})") from None


def _predict_texts(args: argparse.Namespace, adapter: object, meta: dict) -> int:
    with_tta(adapter.model, meta, args.tta)  # --tta on a text run is one line
    predictions = predict_texts(adapter, meta["classes"], _read_texts(args), args.top_k or TOP_K, precision=run_precision(meta))
    if args.json:
        entries = [
            {"text": p.path, "label": p.labels[0][0], "probability": p.labels[0][1],
             "predictions": [{"label": label, "probability": value} for label, value in p.labels]}
            for p in predictions
        ]
        print(json.dumps({"predictions": entries}))
        return 0
    # Tab-separated, the text last: label and probability first, as `cut -f1,2` reads them; with --top-k, the next
    # classes' pairs follow in order. A tab or line break in the text is shown as a space: one line, its columns fixed.
    for prediction in predictions:
        shown = prediction.labels[: args.top_k or 1]
        text = " ".join(prediction.path.replace("\t", " ").splitlines())
        print("\t".join([*(f"{label}\t{probability:.3f}" for label, probability in shown), text]))
    return 0


def run_export(args: argparse.Namespace) -> int:
    adapter, meta = load_run(args.run)
    if args.output is not None and not args.output.strip():  # an unset variable: not the run's default export, unseen
        raise ThawError("--output is empty; name the file to write, or leave --output out for the run's own export")
    if args.output == "-":  # a runtime loads an export from a file (the ONNX one may need its weights file beside it)
        raise ThawError(f"--output - : an export is written to a file, not to standard output; name the file, such as {_export_name(args.format)}")
    if args.output is not None and names_a_folder(args.output):  # Path() drops a last / or /.: model.onnx/ became a file
        suggested = _file_in(Path(args.output), args.format, Path(args.run), meta)
        raise ThawError(f"--output {args.output} names a folder; name the file to write, such as {suggested}")
    output = Path(args.output or Path(args.run) / (ONNX_EXPORT if args.format == "onnx" else TORCHSCRIPT_EXPORT))
    try:
        _check_output(output, args.format, Path(args.run), meta)
    except OSError as error:  # a name the file system refuses (too long): said, not a traceback
        raise ThawError(f"cannot use --output {output} ({error.strerror or error}); name another file, such as {Path(args.run) / _export_name(args.format)}") from None
    images = [] if meta.get("task") == "text" else check_images(meta, adapter.preprocessing)
    try:
        check = export_model(adapter, output, args.format, images, export_description(meta))
    except OSError as error:
        raise ThawError(f"cannot write {output} ({error.strerror or error}); choose another --output") from None
    written = f"{output} and its weights {check.weights_file} (keep the two together)" if check.weights_file else str(output)
    print(f"wrote {written}; outputs match PyTorch within {check.difference:.1e}, {_checked_on(check, meta)}")
    return 0


# The suffixes each format's files go by; a file named for the other format would be opened by the wrong runtime.
EXPORT_SUFFIXES = {"onnx": (".onnx",), "torchscript": (".pt", ".pth", ".ts", ".torchscript")}


def _export_name(fmt: str) -> str:
    return ONNX_EXPORT if fmt == "onnx" else TORCHSCRIPT_EXPORT


def _file_in(folder: Path, fmt: str, run: Path, meta: dict) -> Path:
    """The file to suggest for an --output that names a folder: one in it, unless it is (or is in) the run's data,
    where a model has no place (the data is what users copy, share and train on again): the run's own then."""
    data = recorded_data_path(meta)
    return run / _export_name(fmt) if data and lies_within(folder, Path(data)) else folder / _export_name(fmt)


def _check_output(output: Path, fmt: str, run: Path, meta: dict) -> None:
    """A file the export can write: not a folder, not named for the other format, not another run's; its folder is made
    when missing."""
    other = next((name for name, suffixes in EXPORT_SUFFIXES.items() if name != fmt and output.suffix.lower() in suffixes), None)
    if other:
        wanted = EXPORT_SUFFIXES[fmt][0]
        raise ThawError(f"--output {output} is named for {other}, and --format is {fmt}; name it {output.with_suffix(wanted).name}, or use --format {other}")
    if output.is_dir():
        raise ThawError(f"--output {output} is a folder; name the file to write, such as {_file_in(output, fmt, run, meta)}")
    default = run / (ONNX_EXPORT if fmt == "onnx" else TORCHSCRIPT_EXPORT)
    data = recorded_data_path(meta)
    if data and file_would_be_read(Path(data), output):  # in a class folder, or a new folder among them (an empty class)
        raise ThawError(f"--output {output} is among the images of {data}, where the next run on it would read it; write the export elsewhere, such as {default}")
    if output.exists() and not output.is_file():
        raise ThawError(f"--output {output} is not a regular file (a device or a pipe); name a file, such as {default}")
    holder = output.parent.parent if output.parent.name in RUN_FOLDERS else output.parent
    if holds_run(holder) and holder.resolve() != run.resolve():  # its model.onnx is that run's model, for whoever uses it
        raise ThawError(f"--output {output} is in the folder of another run, {holder}; write the export elsewhere, such as {default}")
    if is_run_file(output):
        raise ThawError(f"--output {output} is one of the run's own files; write the export beside them, such as {default}")
    # Only an earlier export of this format is written over: a file of another kind, by its suffix, and then any file
    # thaw did not export, by what thaw writes into its exports (before the run's data is read for the check).
    if output.is_file() and output.suffix and output.suffix.lower() not in EXPORT_SUFFIXES[fmt]:
        raise ThawError(f"--output {output} exists and is not a {fmt} file ({', '.join(EXPORT_SUFFIXES[fmt])}); choose another --output")
    check_replaceable(output, fmt)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ThawError(f"cannot write {output}: its folder cannot be made ({error.strerror or error}); choose another --output") from None


def _checked_on(check: ExportCheck, meta: dict) -> str:
    if check.token_lengths:
        sizes = ", ".join(f"{b}x{t}" for b, t in zip(check.batch_sizes, check.token_lengths))
        return f"checked on text batches of {sizes} (texts x tokens)"
    noise = f"{check.noise_batches} noise batches"
    if check.real_images:
        return f"checked on {check.real_images} real images of the run's data and {noise}"
    folder = meta.get("data", {}).get("path")
    why = f"no readable images found in {folder}" if folder and Path(folder).exists() else "the run's data folder is gone"
    return f"checked on noise only ({noise}): {why}"
