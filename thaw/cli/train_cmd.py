"""`thaw train DATA --model M --strategy S --out RUN`: run a plan, leave a run folder."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import fields, replace
from functools import partial
from pathlib import Path

from thaw import distributed
from thaw.cli.options import (
    add_model_options, add_plan_options, beta_alpha, checked_batch_size, chosen_strategy, non_negative_int, path_text, plan_from_args, positive_int, share,
    share_or_zero,
)
from thaw.data.manifest_check import check_image_table
from thaw.data.transforms import AUTO_AUGMENTS
from thaw.models import build_model
from thaw.models.hf_text import DEFAULT_MAX_LENGTH, POOLINGS, build_text_model
from thaw.models.sources import TASKS, hf_source, task_of
from thaw.errors import ThawError, denied
from thaw.export.report import write_report
from thaw.export.run_dir import check_delivered_weights
from thaw.train.checkpoint import CHECKPOINT
from thaw.train.fit import InterruptedAfterWriting, RunInterrupted, how_to_continue, interrupted_before_training
from thaw.train.loggers import LOGGERS, check_store_outside_data, close_loggers, make_loggers
from thaw.train.run_folder import METADATA, TYPED_OPTIONS as COMMAND, RunInUse, check_new_run, check_nothing_set_aside, holds_run, is_finished, read_finished
from thaw.plan import plan_to_dict
from thaw.plan.config import read_plan_file
from thaw.plan.strategies import DEFAULT_EPOCHS
from thaw.train.budget import parse_budget
from thaw.train.progress import clock
from thaw._io import NEW_RUN_NOT_WRITABLE, RESUME_NOT_WRITABLE, atomic_write, check_writable, missing_folders, remove_made_folders
from thaw.train import RunResult, check_model_object, check_out_outside_data, RunState, TextColumns, TrainConfig, resume_run, saved_settings, train_images, train_text
from thaw.train.config import METRICS, PRECISIONS, SCHEDULES, checked_training_options
from thaw._device import resolve_device
from thaw.train.fit import uses_bf16
from thaw.train.settings import ADDED_LATER, RUNTIME_FIELDS, differences, source_name
from thaw.plan.optim import OPTIMIZERS


def register(commands: argparse._SubParsersAction) -> None:
    # No abbreviated options: a resume must know exactly which options were typed.
    parser = commands.add_parser("train", help="fine-tune a model on labelled images or text", allow_abbrev=False)
    parser.add_argument(
        "data", nargs="?", type=path_text,
        help="images: folder with train/ and val/, folder of class folders, or CSV (or TSV) manifest; text: a CSV/TSV table "
        "(with --resume: optional)",
    )
    add_model_options(parser, required=False)
    parser.set_defaults(weights="DEFAULT")
    PLAN_DESTS.update(action.dest for action in add_plan_options(parser)._group_actions)
    add_training_options(parser)
    add_text_options(parser)
    parser.add_argument("--out", type=path_text, help="run folder (default runs/MODEL-STRATEGY)")
    parser.add_argument(
        "--resume", type=path_text, metavar="RUN", help="continue the run in RUN from its last checkpoint, with its own settings"
    )
    parser.add_argument(
        "--overwrite", action="store_true",
        help="start a new run in --out even where a run lies: the old run's weights, checkpoint, plots, report and exports "
        "are removed first (without it, such a folder is refused)",
    )
    parser.add_argument("--json", action="store_true", help="end with one JSON line of results")
    add_output_options(parser)
    parser.set_defaults(handler=run, parser=parser)


PLAN_DESTS: set[str] = set()
# Options that change how a run goes, not what it computes: free to differ on --resume. What a run
# writes beside its weights (a report, logs for other tools) is one of them: it never changes the weights.
EPOCH_OPTIONS = ("epochs", "head_epochs")
RUNTIME_DESTS = RUNTIME_FIELDS | {"json", "resume", "out", "data", "report", "log", "overwrite"}
TEXT_DESTS = {"text_column": "text", "label_column": "label", "delimiter": "delimiter"}
TEXT_ONLY_DESTS = {*TEXT_DESTS, "test_split", "max_length", "pooling"}  # options an image run has no use for
TEXT_HINT = "to train on text, add --task text and a text --model"


def add_training_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--batch-size", type=checked_batch_size, default=32)
    group.add_argument("--val-split", type=share, help="share held out for validation when DATA has no val/ (images 0.2, text 0.1)")
    group.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    group.add_argument("--schedule", choices=SCHEDULES, default="cosine")
    group.add_argument("--warmup", type=float, default=0.1, help="share of each stage's steps spent warming up")
    group.add_argument("--precision", choices=PRECISIONS, default="auto", help="auto: bf16 where the device supports it")
    group.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    group.add_argument("--grad-clip", type=float)
    group.add_argument(
        "--label-smoothing", type=share_or_zero, default=0.1, metavar="SHARE",
        help="smooth the training targets by this share (default 0.1, chosen by benchmarks/recipes.py; 0 turns it off); "
        "val loss stays plain",
    )
    group.add_argument(
        "--ema", action=argparse.BooleanOptionalAction, default=True,
        help="measure and deliver a moving average of the weights in stages that train pretrained layers (default: on, "
        "chosen by benchmarks/recipes.py); --no-ema trains and delivers the weights themselves",
    )
    group.add_argument(
        "--budget", type=budget_seconds, metavar="TIME",
        help="choose the epochs per stage to finish training within TIME (90s, 3m, 1.5h, 1h30m; a bare number is seconds), measured on this machine",
    )
    group.add_argument(
        "--compile", action="store_true",
        help="torch.compile the training forward of stages that run the network (off by default: slower on the 2-core CPU "
        "it was measured on, compile time included: README, Speed); image models; free to differ on --resume",
    )
    group.add_argument("--accumulate", type=positive_int, default=1, help="gradient accumulation steps")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--workers", type=non_negative_int, help="DataLoader workers (default: 0 below 4 cores)")
    group.add_argument("--metric", choices=METRICS, default="accuracy", help="validation metric that picks the best epoch")
    group.add_argument(
        "--early-stopping", type=positive_int, metavar="EPOCHS", help="end a stage after this many epochs without improvement"
    )
    group.add_argument("--no-augment", dest="augment", action="store_false")
    group.add_argument(
        "--progressive-resize", type=share, metavar="SHARE",
        help="stages that run the whole network train their first epoch on crops this share of the image size, "
        "growing to the full size by their last epoch (fastai's progressive resizing; less compute per early epoch)",
    )
    group.add_argument(
        "--auto-augment", type=auto_augment, metavar="{" + ",".join((*AUTO_AUGMENTS, "none")) + "}",
        help="after the random crop and flip, torchvision's TrivialAugmentWide (trivial) or RandAugment (rand: 2 ops at "
        "strength 9) on each training image (default: none; none also overrides a plan file's auto_augment)",
    )
    group.add_argument(
        "--mixup", type=beta_alpha, default=0.0, metavar="ALPHA",
        help="blend each training batch's images pairwise, and their labels in the same shares drawn from Beta(ALPHA, ALPHA) "
        "(0.2 is usual; default 0: off); stages on cached features are not blended; train accuracy counts each image's "
        "own label, so it reads lower on blended batches",
    )
    group.add_argument(
        "--cutmix", type=beta_alpha, default=0.0, metavar="ALPHA",
        help="paste a box of one training image into its neighbour, labels in the shares of area (1.0 is usual; "
        "default 0: off); with --mixup too, each batch takes one of the two",
    )
    group.add_argument("--image-size", type=positive_int, help="override the weights' input size")
    group.add_argument("--strict", action="store_true", help="fail on unreadable files instead of skipping them")
    group.add_argument("--device", default="auto")
    group.add_argument("--no-cache", dest="cache", action="store_false", help="never train on cached frozen features")
    group.add_argument(
        "--cache-views", type=non_negative_int, default=0, metavar="K",
        help="cache K augmented views per image (default: the evaluation view)",
    )
    group.add_argument(
        "--no-prefix-cache", dest="cache_prefix", action="store_false",
        help="stages that train only the top groups run the frozen bottom on the images every epoch, instead of once per cached view",
    )
    group.add_argument("--quiet", action="store_true")


def add_output_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("what the run writes besides its weights (never changes them)")
    group.add_argument("--report", action="store_true", help="end by writing RUN/report.html on the val split (see thaw report)")
    group.add_argument(
        # --log-to as well: torchrun's own parser reads a bare --log as an ambiguous prefix of its --log-dir
        "--log", "--log-to", dest="log", choices=LOGGERS, action="append", default=[],
        help="also log to TensorBoard (RUN/tensorboard) or MLflow (./mlruns, or MLFLOW_TRACKING_URI); repeat for both; "
        "under torchrun write --log-to",
    )


def add_text_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("text (Hugging Face encoders)")
    group.add_argument(
        "--task", choices=TASKS, help="default: text when --model is a Hugging Face folder (config.json) or hf/ID, else image"
    )
    group.add_argument("--text-column", help="name or 0-based position of the text column (default: inferred)")
    group.add_argument("--label-column", help="name or 0-based position of the label column (default: inferred)")
    group.add_argument("--delimiter", help="column separator (default: tab for .tsv or tab-separated files, else comma)")
    group.add_argument(
        "--test-split", type=share_or_zero, default=0.0, help="share held out first as a test split (thaw evaluate --split test)"
    )
    group.add_argument("--max-length", type=positive_int, default=DEFAULT_MAX_LENGTH, help="tokens kept per text")
    group.add_argument("--pooling", choices=POOLINGS, default="mean", help="how token states become one vector")


def auto_augment(text: str) -> str | None:
    """An --auto-augment policy; `none` is no policy (a typed flag that overrides a plan file's)."""
    if text == "none":
        return None
    if text not in AUTO_AUGMENTS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join((*AUTO_AUGMENTS, 'none'))}, got {text!r}")
    return text


def budget_seconds(text: str) -> float:
    try:
        return parse_budget(text)
    except ThawError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The training options typed, else the plan file's `training:` ones, else the defaults."""
    names = {f.name for f in fields(TrainConfig)}
    values = {name: getattr(args, name) for name in names if hasattr(args, name)}
    from_file: dict[str, object] = {}
    if getattr(args, "config", None):
        typed = given_options(args.parser, args.argv)
        from_file = checked_training_options(args.config, {k: v for k, v in read_plan_file(args.config)[1].items() if k not in typed})
        values |= from_file
    try:
        return TrainConfig(**values)
    except ThawError as error:  # a file's value against a typed flag (mixup: in the file, --no-augment typed): say where
        named = [key for key in from_file if _problem(values | {key: getattr(TrainConfig(), key)}) != str(error)]
        if not named:
            raise
        raise ThawError(f"{error} ({', '.join(named)}: from {args.config}'s training:)") from None


def _problem(values: dict) -> str | None:
    """What TrainConfig says of these values, or None: a file's key whose default changes it takes part in the problem."""
    try:
        TrainConfig(**values)
    except ThawError as error:
        return str(error)
    return None


def print_epoch(state: RunState, unit: str = "img") -> None:
    """One line per epoch; `unit` names a sample in the rate ("texts" for a text run)."""
    row = state.history[-1]
    top5 = f" top5 {row['val_top5']:.3f}" if row.get("val_top5") is not None else ""
    # An epoch that loads its data says how much of it went to waiting for batches: where that is large, the data
    # path, not the model, sets the speed (--workers). Cached features (and rows of runs before thaw measured it): None.
    waited = f", waiting for data {row['data_wait_share']:.0%}" if row.get("data_wait_share") is not None else ""
    print(
        f"{row['stage']} {row['stage_epoch']}: train loss {row['train_loss']:.3f} acc {row['train_accuracy']:.3f} | "
        f"val loss {row['val_loss']:.3f} acc {row['val_accuracy']:.3f} f1 {row['val_macro_f1']:.3f}{top5} "
        f"({row['seconds']:.1f} s, {row['images_per_s']:.0f} {unit}/s{waited})",
        flush=True,
    )


def _start(args: argparse.Namespace, config: TrainConfig, out: Path, callbacks: list, step_hooks: list) -> RunResult:
    if task_of(args) == "text":
        _refuse_weights_for_text(args)
        adapter = build_text_model(hf_source(args.model), num_classes=2, device="meta", load=False)
        columns = TextColumns(args.text_column, args.label_column, args.delimiter)
        return train_text(
            args.data, model=hf_source(args.model), plan=plan_from_args(args, len(adapter.groups)), config=config, out=out,
            columns=columns, val_split=0.1 if args.val_split is None else args.val_split, test_split=args.test_split,
            pooling=args.pooling, max_length=args.max_length, resume=bool(args.resume), overwrite=args.overwrite, callbacks=callbacks,
            step_hooks=step_hooks,
        )
    check_image_table(args.data, TEXT_HINT)
    _refuse_text_options(args)
    adapter = build_model(args.model, num_classes=2, device="meta")
    return train_images(
        args.data, model=args.model, weights=args.weights, plan=plan_from_args(args, len(adapter.groups)), config=config, out=out,
        val_split=args.val_split, resume=bool(args.resume), overwrite=args.overwrite,
        callbacks=callbacks, step_hooks=step_hooks,
    )


def _refuse_weights_for_text(args: argparse.Namespace) -> None:
    """A text encoder's weights are the ones in its --model folder: --weights was read by nothing, a file and none alike."""
    if "weights" in typed_options(args):
        raise ThawError(
            f"--weights {args.weights}: a text run's weights are the ones in --model (a Hugging Face folder or hf/ORG/NAME); "
            "drop --weights"
        )


def _refuse_text_options(args: argparse.Namespace, resumed: bool = False) -> None:
    """Text options typed for an image run did nothing: --test-split held no test set out, without a word."""
    typed = typed_options(args) & TEXT_ONLY_DESTS
    if typed:
        flags = ", ".join(f"--{dest.replace('_', '-')}" for dest in sorted(typed))
        hint = "a resume cannot change it" if resumed else "--task text for a text table"
        raise ThawError(f"{flags}: text options, and this is an image run ({hint}); drop them")


def typed_options(args: argparse.Namespace) -> set[str]:
    """The dests of the options typed; none for a namespace built by hand, which records nothing typed."""
    return given_options(args.parser, args.argv) if hasattr(args, "parser") and hasattr(args, "argv") else set()


def given_options(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The dests of the options typed on the command line, whatever their values."""
    typed = set()
    for action in parser._actions:
        if any(token == option or token.startswith(option + "=") for option in action.option_strings for token in argv):
            typed.add(action.dest)
    return typed


def _claimed(args: argparse.Namespace, typed: set[str], settings: dict, run: Path) -> dict:
    """What the typed options say, in the shape of the run's recorded settings."""
    claimed: dict = {"config": {}}
    for dest in typed - RUNTIME_DESTS - PLAN_DESTS:
        value = getattr(args, dest)
        if dest in settings["config"] or dest in ADDED_LATER:  # a field the run predates: compared with its old value
            claimed["config"][dest] = value
        elif dest in TEXT_DESTS:
            claimed.setdefault("columns", dict(settings.get("columns") or {}))[TEXT_DESTS[dest]] = value
        else:  # model, weights, task, val/test split, pooling, max length
            claimed[dest] = source_name(hf_source(value)) if dest in ("model", "weights") else value
    if claimed["config"].get("precision") == "auto":  # what auto means here, as the run recorded it
        bf16 = uses_bf16("auto", resolve_device(args.device))
        claimed["config"]["precision"] = "bf16" if bf16 else "fp32"
    if typed & PLAN_DESTS:  # untyped plan options as the run was started, so only typed ones can differ
        started = argparse.Namespace(**(vars(args) | _typed_plan_options(run)))
        for dest in typed & PLAN_DESTS:
            setattr(started, dest, getattr(args, dest))
        started.model, started.task = settings["model"], settings.get("task")
        if "top_groups" in typed and started.config and "config" not in typed:
            raise ThawError(
                f"--resume {run}: the run was started with --config {started.config}, whose stages say what trains, so "
                f"--top-groups does not apply; `thaw train --resume {shlex.quote(str(run))}` alone continues the run as it was started"
            )
        if "top_groups" not in typed and (started.config or chosen_strategy(started) != "head-top-all"):
            started.top_groups = None  # the run's --top-groups went with its plan; the typed one is what differs
        one_stage = {"epochs", "head_epochs"}
        if not started.config and chosen_strategy(started) == "feature-extract":
            if len(typed & one_stage) == 1:
                # its one stage takes the typed number; a run started before it took either recorded the other's default
                setattr(started, (one_stage - typed).pop(), None)
            elif not typed & one_stage and started.epochs is not None and started.head_epochs is not None:
                # the run's own two numbers (another strategy's) would be refused as typed together, by a command that
                # typed neither: the head's is taken, and the plans compared say what differs
                started.epochs = None
        claimed["plan"] = plan_to_dict(plan_from_args(started, _group_count(started), recorded=True))
    return claimed


def _typed_plan_options(run: Path) -> dict:
    """The plan options of the command that started the run (empty when it was started from Python)."""
    try:
        return json.loads((run / COMMAND).read_text())["plan_options"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _plan_options(args: argparse.Namespace) -> dict:
    """The plan options as the run uses them: the strategy resolved where none was typed (it depends on the task),
    so a resume and MLflow see the one that ran."""
    strategy = None if args.config else chosen_strategy(args)  # a plan file's plan names no strategy
    return {dest: getattr(args, dest) for dest in sorted(PLAN_DESTS)} | {"strategy": strategy}


class TypedOptionsRecord:
    """A step hook that writes RUN/command.json, the plan options as typed, at the run's first step: after an
    --overwrite has removed the old run's files (this one among them), before the first checkpoint, which is what a
    resume compares the typed options against."""

    def __init__(self, out: Path, options: dict) -> None:
        self.out, self.options = out, options

    def __call__(self, _optimizer: object, _step: int, _factor: float) -> None:
        if self.options is not None:
            options, self.options = self.options, None
            atomic_write(self.out / COMMAND, lambda target: target.write_text(json.dumps({"plan_options": options})))


def _group_count(args: argparse.Namespace) -> int:
    if task_of(args) == "text":
        return len(build_text_model(hf_source(args.model), num_classes=2, device="meta", load=False).groups)
    return len(build_model(args.model, num_classes=2, device="meta").groups)


def _check_resume_options(args: argparse.Namespace, run: Path, settings: dict, *, finished: bool = False) -> None:
    """Typed options beside --resume must agree with the run's recorded settings, finished or not. A finished run's
    refusal says how to train longer: `--resume` alone would only say it is complete."""
    if args.out and Path(args.out).resolve() != run.resolve():
        raise ThawError(f"--out {args.out} and --resume {run} name two runs; a resume writes into the run it continues")
    check_model_object(run, settings, None, "resume_run")  # before typed options are compared: that rebuilds the model by name
    if settings.get("task") != "text":  # an image run records no text options, so none would be compared: refuse them
        _refuse_text_options(args, resumed=True)
    claimed = _claimed(args, given_options(args.parser, args.argv), settings, run)
    found = differences({key: settings[key] for key in claimed if key in settings}, claimed)
    if found:
        raise ThawError(f"--resume {run}: the typed options contradict the run's own settings: {'; '.join(found)}; {_resume_hint(run, settings, finished)}")


def _resume_hint(run: Path, settings: dict, finished: bool) -> str:
    """What to type instead: a run still going continues as started; a finished one trains nothing more, so options
    meant for more training need a new run (typed with --resume, or with --out elsewhere, they are refused)."""
    if not finished:
        return f"`thaw train --resume {shlex.quote(str(run))}` alone continues the run as it was started"
    data = shlex.quote(settings["data_path"]) if settings.get("data_path") else "DATA"
    return (f"the run is complete, so a resume trains nothing more: to train with these options, drop --resume and "
            f"start a new run, `thaw train {data} --out NEW_RUN` and the options, or replace this one with --out {shlex.quote(str(run))} --overwrite")


def _resume(args: argparse.Namespace, run: Path, settings: dict, callbacks: list, step_hooks: list) -> RunResult:
    """Continue RUN with the settings it recorded; typed options must agree with them."""
    _check_resume_options(args, run, settings)
    if args.data and settings.get("task") != "text":
        check_image_table(args.data, f"{run} is an image run: pass the images it was trained on")
    runtime = {"workers": args.workers, "device": args.device, "quiet": args.quiet or args.json, "strict": args.strict, "compile": args.compile}
    return resume_run(run, data_path=args.data, callbacks=callbacks, step_hooks=step_hooks, **runtime)


def run(args: argparse.Namespace) -> int:
    main_rank = distributed.from_environment().is_main  # under torchrun only rank 0 prints
    quiet = args.json or args.quiet or not main_rank
    if args.overwrite and args.resume:
        raise ThawError(f"--overwrite starts a new run and --resume {args.resume} continues one; drop one of the two")
    if args.resume and is_finished(Path(args.resume)):  # nothing left to train: its files stay as they are
        return _say_finished(args, Path(args.resume)) if main_rank else 0
    settings = saved_settings(args.resume) if args.resume else None
    text = settings.get("task") == "text" if settings else bool(args.model) and task_of(args) == "text"
    callbacks = [] if quiet else [partial(print_epoch, unit="texts" if text else "img")]
    if settings is None and (args.data is None or args.model is None):  # a new run; or a resume of an older thaw's checkpoint
        if args.resume and Path(args.resume).is_file():  # RUN/thaw.json, say: as train.resume says it
            raise ThawError(f"--resume {args.resume} is a file of a run; pass the run's folder, {Path(args.resume).parent}")
        if args.resume and not Path(args.resume).is_dir():
            raise ThawError(f"--resume {args.resume}: no such run folder; pass the folder a run wrote (its --out)")
        if args.resume:  # a run a killed --overwrite set aside is the folder's only run: say so, not "no checkpoint"
            check_nothing_set_aside(Path(args.resume))
        why = f"{args.resume} holds no checkpoint of a run (--resume takes the folder a run wrote, its --out), so " if args.resume else ""
        raise ThawError(f"{why}thaw train needs DATA and --model (see `thaw train --help`)")
    out = _out_folder(args)
    # before the run writes anything there: the old run stays as it is; a resume with no checkpoint starts a new run
    if main_rank and (not args.resume or not holds_run(out)):
        check_new_run(out, args.overwrite)
    if args.data and settings is None:  # a new run, or a resume with no checkpoint (which starts one): before a logger
        check_out_outside_data(out, Path(args.data), "--resume" if args.resume else "--out")  # writes into it (mlruns/)
    data_path = args.data or (settings or {}).get("data_path")  # a resume reads the recorded data by default
    if main_rank and data_path:
        check_store_outside_data(args.log, Path(data_path))
    created = missing_folders(out)  # removed again if the run is refused before its first checkpoint
    if main_rank and args.log:  # before any work: a logger writes into the run folder, and a missing package stops here
        check_writable(out, RESUME_NOT_WRITABLE if settings is not None else NEW_RUN_NOT_WRITABLE)
    loggers = make_loggers(args.log, out, settings or _typed_settings(args)) if main_rank else []
    ending, refused = "FAILED", False
    started = time.time()  # a checkpoint written since is this run's: only then is "--resume" the way on
    try:
        result = _train(args, out, settings, callbacks + [logger.epoch for logger in loggers], loggers)
        code = _finish(args, out, result) if main_rank else 0
        ending = "FINISHED"
        return code
    except RunInterrupted:
        ending = "KILLED"  # stopped by the user, with a checkpoint to resume from: not a failure
        raise
    except (KeyboardInterrupt, ThawError, PermissionError) as stopped:  # bad input (unreadable data), or Ctrl-C while setting up
        # Nothing to resume or keep: undo the start; but a folder another thaw trains into is that run's, untouched.
        refused = main_rank and settings is None and not holds_run(out) and not isinstance(stopped, RunInUse)
        if isinstance(stopped, PermissionError) and main_rank and _checkpoint_since(out, started, bool(args.resume)):
            raise ThawError(f"{denied(stopped)}; check its permissions, then {how_to_continue(out)}") from None
        if isinstance(stopped, (ThawError, PermissionError)):  # main says a PermissionError in one line
            raise
        ending = "KILLED"
        if isinstance(stopped, InterruptedAfterWriting):  # it came as the run ended, and was held until its files were written
            raise RunInterrupted(
                f"interrupted as the run ended, after its files were written: {out} is complete; use it with thaw evaluate, "
                "predict or export"
            ) from None
        # Not only while the run was set up: a second Ctrl-C, for one; and under torchrun thaw leaves Ctrl-C to the launcher.
        when = "under torchrun" if distributed.from_environment().distributed else None
        raise RunInterrupted(interrupted_before_training(out, when)) from None
    finally:  # after the report, so MLflow stores it with the run folder
        close_loggers(loggers, ending)
        if refused:
            _remove_started_run(out, created)


def _checkpoint_since(out: Path, started: float, resumed: bool) -> bool:
    """Whether `out` holds a checkpoint of the run this command trains: a resumed run's, or one written since it
    started (with --overwrite, an old run's checkpoint still in place is the run being replaced, not this one)."""
    try:
        return (out / CHECKPOINT).is_file() and (resumed or (out / CHECKPOINT).stat().st_mtime >= started - 1)  # coarse file clocks
    except OSError:
        return False


def _say_finished(args: argparse.Namespace, run: Path) -> int:
    """`--resume` of a run that has ended: say so, with what it delivered, and leave every file of it as it is. Typed
    options are checked as for a run still going: a contradiction is not "complete"."""
    recorded = read_finished(run / METADATA)
    check_delivered_weights(run)  # "complete" only where evaluate, predict and export can use it
    check_model_object(run, recorded, None, "resume_run")  # such a run is used from Python only: say how
    settings = saved_settings(run)
    if settings is not None:
        _check_resume_options(args, run, settings, finished=True)
    if args.report:
        raise ThawError(f"{run} is complete: there is nothing to train before a report; write it with thaw report {run}")
    if args.log:
        raise ThawError(f"{run} is complete: there is no training left to log (--log {' '.join(args.log)})")
    best, unread = recorded["best"], _other_data_unread(args.data, recorded.get("data_path"))
    if args.json:
        print(json.dumps({
            "complete": True, "val_accuracy": best["val"]["accuracy"], "best_epoch": best["epoch"], "why": best.get("why"),
            "wall_s": round(recorded.get("wall_s", 0.0), 2), "out": str(run),
        } | ({"data_not_read": args.data} if unread else {})))
        return 0
    print(
        f"{run} is complete (delivered epoch {best['epoch']}, val accuracy {best['val']['accuracy']:.4f}): nothing left to "
        f"resume, its files are as they were; use it with thaw evaluate, predict or export, or train anew with --overwrite"
        + unread
    )
    return 0


def _other_data_unread(typed: str | None, trained_on: str | None) -> str:
    """Where DATA typed with --resume of a finished run is not what it trained on: say that it was not read, so that
    a user who meant to train on it does not take "complete" for an answer about that data."""
    if typed is None or not isinstance(trained_on, str) or Path(typed).resolve() == Path(trained_on).resolve():
        return ""
    return f" ({typed} was not read: the run was trained on {trained_on}; a new run on it needs another --out)"


def _out_folder(args: argparse.Namespace) -> Path:
    if args.resume:
        return Path(args.resume)
    return Path(args.out or f"runs/{Path(args.model).name or args.model.replace('/', '_')}-{chosen_strategy(args)}")


def _typed_settings(args: argparse.Namespace) -> dict:
    """What MLflow records as params for a new run: the model, the data and every training and plan option, epochs as
    they ran (untyped ones are None in command.json, which a resume compares; MLflow compares runs by the number)."""
    plan = _plan_options(args)
    typed = [plan[key] for key in EPOCH_OPTIONS if plan.get(key) is not None]
    untyped = typed[0] if typed and plan["strategy"] == "feature-extract" else DEFAULT_EPOCHS  # its one stage takes either
    plan |= {key: untyped for key in EPOCH_OPTIONS if plan.get(key) is None}
    return {"model": args.model, "weights": args.weights, "data": args.data, "config": vars(config_from_args(args)), "plan": plan}


def _train(args: argparse.Namespace, out: Path, settings: dict | None, callbacks: list, step_hooks: list) -> RunResult:
    quiet = args.json or args.quiet or not distributed.from_environment().is_main
    if settings is not None:
        return _resume(args, out, settings, callbacks, step_hooks)
    config = replace(config_from_args(args), quiet=quiet)  # a new run; or a resume before the first checkpoint
    if distributed.from_environment().is_main:
        check_writable(out)
        step_hooks = [*step_hooks, TypedOptionsRecord(out, _plan_options(args))]
    return _start(args, config, out, callbacks, step_hooks)


def _remove_started_run(out: Path, created: list[Path]) -> None:
    """Undo what starting the run wrote: the typed options, and the folders it made where nothing else is in them
    (a logger's files stay, with their folder)."""
    try:
        (out / COMMAND).unlink(missing_ok=True)
    except OSError:  # out never became a folder (its parent is a file, say): there is nothing to undo
        return
    remove_made_folders(created)


def _finish(args: argparse.Namespace, out: Path, result: RunResult) -> int:
    """Rank 0, after training: the report when asked, then the summary (exit 1 when the report failed)."""
    report, problem = _try_report(out, args.data) if args.report else (None, None)
    code = _summary(args, out, result, report)
    if problem:  # after the summary: the trained run is saved and reported before the report's failure
        print(f"thaw: error: the run in {out} is saved, but its report failed ({problem}); `thaw report {shlex.quote(str(out))}` tries again",
              file=sys.stderr)
        return 1
    return code


def _try_report(out: Path, data: str | None) -> tuple[Path | None, str | None]:
    """RUN/report.html, or why it could not be written: at the end of a long run a report that fails
    (data moved, a disk full) must not hide the trained model behind a traceback."""
    try:
        return write_report(out, data)[0], None
    except ThawError as error:
        return None, str(error)
    except Exception as error:  # noqa: BLE001 - any failure of the report leaves the trained run intact
        return None, f"{type(error).__name__}: {error}".splitlines()[0][:300]


def _summary(args: argparse.Namespace, out: Path, result: RunResult, report: Path | None) -> int:
    best = result.best
    if args.json:
        summary = {
            "val_accuracy": best["val"]["accuracy"], "best_epoch": best["epoch"], "why": best.get("why"), "wall_s": round(result.wall_s, 2),
            "decode_s": round(result.decode_s, 2), "images_per_s": round(result.images_per_s, 1), "skipped_files": len(result.skipped), "out": str(out),
        } | ({"report": str(report)} if report else {}) | ({"budget": result.budget} if result.budget else {})
        print(json.dumps(summary))
        return 0
    why = best.get("why") or f"best val {best['metric']} {best['value']:.4f}"  # a checkpoint from before thaw said why
    print(f"delivered epoch {best['epoch']} ({best['stage']}): {why}; {result.wall_s:.1f} s")
    if result.budget:
        ended = f", ended {result.budget['ended_early']} by the budget" if result.budget["ended_early"] else ""
        print(f"budget {clock(result.budget['seconds'])}: epochs per stage {result.budget.get('epochs', 'as resumed')}{ended}")
    print("wrote " + ", ".join(str(p) for p in [*result.files.values(), *([report] if report else [])]))
    return 0
