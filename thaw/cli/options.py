"""Command-line options shared by commands that build a model and a plan."""

from __future__ import annotations

import argparse
import math
import shlex

from thaw.data.text import TextColumns
from thaw.errors import ThawError
from thaw.models.lora import LoraSpec
from thaw.plan import Plan, build_plan
from thaw.plan.stages import MAX_EPOCHS
from thaw.plan.config import read_plan_file
from thaw.models.lora import MAX_LORA_RANK
from thaw.models.sources import task_of
from thaw.plan.lr import MAX_LR
from thaw.plan.freeze import BATCHNORM_POLICIES
from thaw.train.config import MAX_BATCH_SIZE, MIX_ALPHA_RANGE
from thaw.plan.strategies import DEFAULT_EPOCHS, DEFAULT_HEAD_LR, STRATEGIES, TOP_GROUPS, UNUSED_WHEN_UNSET, default_strategy, unused_options

TYPED_PLAN_FLAGS = "typed_plan_flags"  # the namespace attribute that lists the plan options typed, as their flags


def _whole_number(text: str, low: int, high: int | None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"from {low} to {high}"
        shown = text if len(text) <= 24 else f"{text[:12]}... ({len(text)} digits)"
        raise argparse.ArgumentTypeError(f"expected a whole number {bound}, got {shown}")
    return value


def path_text(text: str) -> str:
    """A path as typed; an empty one (an unset shell variable) would silently mean the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return text


def weights_text(text: str) -> str:
    """--weights as typed; an empty one (`--weights "$W"` with W unset) was read as the current folder and trained
    from scratch without a word."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a weights name, a file path or none, got an empty string")
    return text


def non_negative_int(text: str) -> int:
    """Counts where 0 means something: epochs (none in that stage), workers (decode in-process), cached views."""
    return _whole_number(text, 0, None)


def epoch_count(text: str) -> int:
    """A stage's epochs: 0 (none in that stage) up to MAX_EPOCHS, beyond which a count is a typo."""
    return _whole_number(text, 0, MAX_EPOCHS)


def positive_int(text: str) -> int:
    """Sizes and counts that must be at least 1: batch size, accumulation, LoRA rank, steps, top-k."""
    return _whole_number(text, 1, None)


def checked_batch_size(text: str) -> int:
    return _whole_number(text, 1, MAX_BATCH_SIZE)


def class_count(text: str) -> int:
    """A number of classes: a classifier tells at least two apart."""
    return _whole_number(text, 2, None)


def lora_rank(text: str) -> int:
    return _whole_number(text, 1, MAX_LORA_RANK)


def finite_float(text: str) -> float:
    """A number that is neither NaN nor infinite (range checks are the library's)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
    return value


def beta_alpha(text: str) -> float:
    """Mixup's and cutmix's alpha: a finite number >= 0 (0 turns the blending off)."""
    value = finite_float(text)
    low, high = MIX_ALPHA_RANGE
    if not (value == 0 or low <= value <= high):
        raise argparse.ArgumentTypeError(
            f"expected an alpha from {low:g} to {high:g} (0.2 is usual for mixup, 1.0 for cutmix; 0 turns it off), got {text}"
        )
    return value


def share(text: str, zero: bool = False) -> float:
    """A share (of the data held out, of the image size): above 0 (or 0 itself, where `zero`) and below 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a share like 0.2, got {text!r}") from None
    if not ((0 <= value if zero else 0 < value) and value < 1):
        raise argparse.ArgumentTypeError(f"expected a share {'from 0' if zero else 'above 0'} and below 1, like 0.2, got {text}")
    return value


def share_or_zero(text: str) -> float:
    return share(text, zero=True)


def lr_value(text: str) -> tuple[str | None, float]:
    """`1e-3` (the head lr) or `NAME=1e-3` (one group's lr, by group or module name)."""
    name, equals, number = text.rpartition("=")
    try:
        value = float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LR or NAME=LR, got {text!r}") from None
    if equals and not name:  # "$GROUP=5e-2" with GROUP unset: read as the head's lr, it set another group's never
        raise argparse.ArgumentTypeError(f"{text!r} names no group before '='; give NAME=LR (a group or module name), or LR alone for the head")
    return (name or None), checked_lr(value, number)


def lr_range(text: str) -> tuple[float, float]:
    try:
        low, high = (float(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW:HIGH like 1e-5:1e-3, got {text!r}") from None
    low, high = checked_lr(low, text), checked_lr(high, text)
    if low > high:
        raise argparse.ArgumentTypeError(f"expected LOW <= HIGH (stem to head), got {text!r}")
    return low, high


def checked_lr(value: float, text: str) -> float:
    if not (math.isfinite(value) and 0 < value <= MAX_LR):
        raise argparse.ArgumentTypeError(f"an lr must be a positive finite number up to {MAX_LR:g}, got {text}")
    return value


def _mark_typed(namespace: argparse.Namespace, flag: str) -> None:
    typed = list(getattr(namespace, TYPED_PLAN_FLAGS, ()))  # a new list: never one shared with another namespace
    setattr(namespace, TYPED_PLAN_FLAGS, typed if flag in typed else [*typed, flag])


class _TypedStore(argparse._StoreAction):
    """store, recording that the option was typed: a plan file beside it would silently override even a typed
    value equal to the default (--epochs 3)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object, option_string: str | None = None) -> None:
        super().__call__(parser, namespace, values, option_string)
        _mark_typed(namespace, self.option_strings[-1])


class _TypedAppend(argparse._AppendAction):
    """append (--lr, --lora-targets), recording that the option was typed."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object, option_string: str | None = None) -> None:
        super().__call__(parser, namespace, values, option_string)
        _mark_typed(namespace, self.option_strings[-1])


def add_model_options(parser: argparse.ArgumentParser, required: bool = True, text: bool = True) -> None:
    """`text` False: a command for image models alone (lr-find), whose help does not offer text encoders."""
    models = "torchvision name (resnet50), timm/NAME" + (", or a Hugging Face folder or hf/ORG/NAME (text)" if text else "")
    parser.add_argument("--model", required=required, help=models)
    parser.add_argument("--weights", type=weights_text, help="weights name (DEFAULT, IMAGENET1K_V1), a file path, or none")


def add_plan_options(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The options that make the plan; returns their group. Each records that it was typed (TYPED_PLAN_FLAGS), so
    that those --config would override are refused, not ignored."""
    group = parser.add_argument_group("plan")
    store, append = {"action": _TypedStore}, {"action": _TypedAppend}
    group.add_argument(
        "--strategy", choices=STRATEGIES, **store,
        help="default: head-top-all for images (the head, then the top 2 groups, then all); two-phase for text",
    )
    group.add_argument(
        "--config", type=path_text, metavar="PLAN.yaml",
        help="a plan file: its stages set the epochs, what trains, lrs, weight decay and BatchNorm, so the other plan options are refused beside it",
    )
    group.add_argument(
        "--epochs", type=epoch_count, default=None, **store,
        help=f"epochs of each stage after the head-only one (default {DEFAULT_EPOCHS}); fine-tune and lora: of their one stage; "
        "feature-extract: of its one stage, the head's, like --head-epochs (give one, or the same number)",
    )
    group.add_argument(
        "--head-epochs", type=epoch_count, default=None, **store,
        help=f"epochs of the head-only stage (default {DEFAULT_EPOCHS}), feature-extract's one stage included",
    )
    group.add_argument(
        "--lr", type=lr_value, default=[], metavar="LR|NAME=LR", **append,
        help=f"head lr (default {DEFAULT_HEAD_LR:g}); NAME=LR sets one group's lr, repeat for each group",
    )
    group.add_argument("--lr-range", type=lr_range, metavar="LOW:HIGH", **store, help="geometric lrs from stem to head")
    group.add_argument("--layer-decay", type=finite_float, **store, help="each group's lr = head lr x decay^depth")
    group.add_argument("--weight-decay", type=finite_float, default=0.01, **store)
    group.add_argument(
        "--batchnorm", choices=BATCHNORM_POLICIES, **store,
        help="BatchNorm policy for every stage (default: frozen for head-only stages, eval once pretrained layers train)",
    )
    group.add_argument("--groups-per-stage", type=positive_int, default=1, **store, help="gradual: groups unfrozen per stage")
    group.add_argument(
        "--top-groups", type=positive_int, default=None, **store,
        help=f"head-top-all: groups the middle stage trains, the head included (default {TOP_GROUPS}: the last pretrained one and the head)",
    )
    group.add_argument("--lora-rank", type=lora_rank, default=8, **store, help="lora: rank of each adapter")
    group.add_argument("--lora-alpha", type=finite_float, default=16.0, **store, help="lora: scaling (alpha / rank multiplies the update)")
    group.add_argument("--lora-dropout", type=finite_float, default=0.0, **store)
    group.add_argument(
        "--lora-targets", default=[], metavar="SELECTOR", **append,
        help="lora: layers to adapt (default: attention query/value for text, every Linear/Conv2d for vision); repeatable",
    )
    return group


def chosen_strategy(args: argparse.Namespace) -> str:
    """--strategy, else the default for the task."""
    return args.strategy or default_strategy(task_of(args))


def plan_from_args(args: argparse.Namespace, num_groups: int, recorded: bool = False) -> Plan:
    """The plan the options make; `recorded`: a run's own options, rebuilt to compare a resume's with (what an older
    thaw accepted is rebuilt as it ran, not refused)."""
    if args.config:
        plan = read_plan_file(args.config)[0]  # first: a file that cannot be read, or a bad key in it, is the problem to fix first
        _refuse_plan_options_beside(args)
        return plan
    strategy = chosen_strategy(args)
    if args.top_groups is not None and strategy != "head-top-all":  # else it would be ignored without a word
        raise ThawError(f"--top-groups sets head-top-all's middle stage; the strategy here is {strategy}: drop it or add --strategy head-top-all")
    lora_flags = [flag for flag in getattr(args, TYPED_PLAN_FLAGS, ()) if flag.startswith("--lora-")]
    if lora_flags and strategy != "lora":  # else they would be ignored without a word (a dropout of 2 passed, unchecked)
        raise ThawError(f"{', '.join(lora_flags)} set{'s' if len(lora_flags) == 1 else ''} the LoRA adapters; the strategy here is "
                        f"{strategy}: drop {'it' if len(lora_flags) == 1 else 'them'} or add --strategy lora")
    # The last of each wins, as for every other flag typed twice (an override appended to a command): a plain --lr
    # kept its first value while NAME=LR kept its last.
    top_groups = args.top_groups
    as_run = recorded and "--top-groups" not in getattr(args, TYPED_PLAN_FLAGS, ())  # a typed one is checked as new
    if as_run and strategy == "head-top-all" and type(top_groups) is int and top_groups >= num_groups:
        strategy, top_groups = "two-phase", None  # a top stage of every group, which thaw then dropped: two-phase's plan
    options = {name: getattr(args, name) for name in UNUSED_WHEN_UNSET}
    if recorded:  # a run an older thaw started with options its strategy ignored resumes as it ran; typed ones are checked
        typed = {flag[2:].replace("-", "_") for flag in getattr(args, TYPED_PLAN_FLAGS, ())}
        options |= {name: UNUSED_WHEN_UNSET[name] for name in unused_options(strategy, **options) if name not in typed}
    head_lr = next((value for name, value in reversed(args.lr) if name is None), DEFAULT_HEAD_LR)
    named = {name: value for name, value in args.lr if name is not None}
    # Per-group lrs name every group's, so a plain one beside them went unused, unsaid; a run an older thaw recorded
    # with both resumes as it ran.
    if named and any(name is None for name, _ in args.lr) and not recorded:
        raise ThawError(f"--lr {head_lr:g} sets the head lr where no group's lr is named; beside --lr NAME=LR name it too, "
                        f"as --lr head={head_lr:g}")
    return build_plan(
        strategy,
        num_groups=num_groups,
        epochs=args.epochs,
        lr=None if named else head_lr,  # a recorded run's plain lr beside named ones went unused, as it still does
        lrs=named or None,
        weight_decay=args.weight_decay,
        batchnorm=args.batchnorm,
        top_groups=top_groups,
        **options,
        lora=LoraSpec(args.lora_rank, args.lora_alpha, args.lora_dropout, tuple(args.lora_targets)) if args.strategy == "lora" else None,
    )


def _refuse_plan_options_beside(args: argparse.Namespace) -> None:
    """The plan file gives every stage its epochs, selectors, lrs, weight decay and BatchNorm policy: a plan option
    typed beside it would be ignored without a word (a namespace built by hand records none typed)."""
    typed = list(getattr(args, TYPED_PLAN_FLAGS, ()))
    if typed == ["--top-groups"]:
        raise ThawError("--top-groups sets head-top-all's middle stage, and --config gives the stages: drop one of them")
    if typed:
        resumed = getattr(args, "resume", None)  # a run started so before thaw refused it: the resume needs no flag
        hint = f"; `thaw train --resume {shlex.quote(str(resumed))}` alone continues the run as it was started" if resumed else ""
        raise ThawError(
            f"--config {args.config} sets every stage (its epochs, what trains, lrs, weight decay, BatchNorm), so "
            f"{', '.join(typed)} would be ignored: drop {'it' if len(typed) == 1 else 'them'}, or write the change into the plan file{hint}"
        )


def add_table_columns(parser: argparse.ArgumentParser, scored_whole: bool = False) -> None:
    """--text-column, --label-column and --delimiter: how a text table is laid out. `scored_whole`: for evaluate and
    report, a table laid out unlike the run's, scored whole."""
    group = parser.add_argument_group("text tables" + (" laid out unlike the run's (scored whole)" if scored_whole else ""))
    group.add_argument("--text-column", help="name or 0-based position of the text column (default: inferred)")
    group.add_argument("--label-column", help="name or 0-based position of the label column (default: inferred)")
    group.add_argument("--delimiter", help="column separator (default: tab for .tsv or tab-separated files, else comma)")


def table_columns(args: argparse.Namespace) -> TextColumns | None:
    """The columns typed, or None where none was: then the run's own."""
    typed = (args.text_column, args.label_column, args.delimiter)
    return None if typed == (None, None, None) else TextColumns(*typed)


def scored_columns_and_split(args: argparse.Namespace) -> tuple[TextColumns | None, str | None]:
    """What `thaw evaluate` and `thaw report` score: without DATA the run's own data, as the run read it, and its val
    split unless --split names another; DATA given is scored whole unless --split names a split of the run's."""
    columns = table_columns(args)
    if columns is not None and args.data is None:
        raise ThawError("--text-column, --label-column and --delimiter lay out a table given as DATA; the run's own data is read as the run read it")
    return columns, args.split or ("val" if args.data is None else None)
