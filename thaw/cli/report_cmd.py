"""`thaw report RUN [DATA]`: RUN/report.html (RUN/report--NAME.html for other data), a page that shows what the run learned."""

from __future__ import annotations

import argparse
import json

from thaw.cli.options import add_table_columns, path_text, positive_int, scored_columns_and_split
from thaw.cli.use_cmds import warn_if_training_data, warn_scored_skipped
from thaw.data.manifest_check import check_image_table
from thaw.errors import ThawError, WriteError
from thaw.export.report import MAX_TOP_LOSSES, TOP_LOSSES, check_report_output, write_report
from thaw.export.run_dir import read_metadata


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(  # intermixed: `thaw report RUN --split test DATA` gives DATA to the optional positional
        "report", help="write RUN/report.html: curves, per-class scores, confusions, the top losses", intermixed=True
    )
    parser.add_argument("run", type=path_text)
    parser.add_argument("data", nargs="?", type=path_text, help="the data (default: where the run recorded it)")
    parser.add_argument(
        "--split", choices=("train", "val", "test"),
        help="which split to score (default: the run's val split; for DATA given, what thaw evaluate scores: "
        "val of split folders, else all of it)",
    )
    parser.add_argument("--top-losses", type=top_count, default=TOP_LOSSES, metavar="N", help="images or texts in the gallery")
    parser.add_argument("--json", action="store_true", help="one JSON line: the file and the metrics it shows")
    parser.add_argument(
        "--output", type=path_text,
        help="the file to write (default RUN/report.html; RUN/report--NAME.html for DATA not the run's own): the page is "
        "self-contained; a file there is replaced only if it is an earlier report (or empty)",
    )
    add_table_columns(parser, scored_whole=True)
    parser.set_defaults(handler=run)


def top_count(text: str) -> int:
    value = positive_int(text)
    if value > MAX_TOP_LOSSES:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_TOP_LOSSES} top losses, got {text}")
    return value


def run(args: argparse.Namespace) -> int:
    if args.data is not None and read_metadata(args.run).get("task") != "text":
        check_image_table(args.data, f"{args.run} is an image run: report on text with a text run")
    columns, split = scored_columns_and_split(args)  # the same rule as thaw evaluate
    # before the scoring: a place refused (another tool's page there) wastes none; write_report checks the default's
    output = check_report_output(args.output, args.run, args.data) if args.output is not None else None
    try:
        path, report = write_report(args.run, args.data, split, args.top_losses, columns, output)
    except WriteError as error:  # a run folder that is read-only (a shared one, another user's): where else to write
        if output is None:
            raise ThawError(f"{error}; write the page elsewhere with --output FILE.html") from None
        raise
    metrics = report["metrics"]
    if report["scored_skipped"]:  # named, as thaw evaluate names them (the page counts them)
        warn_scored_skipped(tuple(report["scored_skipped"]), report["task"] == "text")
    warn_if_training_data(read_metadata(args.run), args.data, metrics["split"])
    if args.json:
        print(json.dumps({"report": str(path), "split": metrics["split"], "count": metrics["count"], "accuracy": metrics["accuracy"]}))
    else:
        print(f"wrote {path} ({metrics['split']}: {metrics['count']} samples, accuracy {metrics['accuracy']:.4f})")
    return 0
