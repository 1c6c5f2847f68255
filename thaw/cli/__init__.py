"""The `thaw` command: a thin layer over the library. Errors become one line and exit code 2."""

from __future__ import annotations

import argparse
import codecs
import difflib
import io
import os
import re
import select
import sys
from typing import Any, NoReturn, Sequence

from thaw.errors import ThawError, denied


# Options of other tools that a user may type for one of thaw's: a plan file is --config here.
OPTION_ALIASES = {"--plan": "--config", "--plan-file": "--config"}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line that says where to look, not a usage dump.

    `intermixed=True` (a command whose last positional takes any number of values, like thaw predict's paths): options
    may stand between the positionals. Plain argparse gives such a positional nothing once an option has come
    (`thaw predict RUN --top-k 1 a.jpg` left a.jpg unrecognized, bpo-14191); intermixed parsing reads the options
    first, then every positional. Only a command's own parser can: argparse refuses it on a parser with subcommands."""

    def __init__(self, *args: Any, intermixed: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.intermixed, self._intermixing = intermixed, False

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        self._arguments = list(sys.argv[1:] if args is None else args)  # for error(): what was typed after an option
        if not self.intermixed or self._intermixing:  # the intermixed parse calls this twice itself: plain parsing then
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False

    def parse_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None) -> argparse.Namespace:  # type: ignore[override]
        """As argparse's, but an option no parser knows is said by the command's parser, whose --help lists the
        command's options (`thaw --help` lists none), with the option it most likely meant."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = next((action.choices.get(getattr(parsed, action.dest, None)) for action in self._actions
                            if isinstance(action, argparse._SubParsersAction)), None)
            (command or self).error(f"unrecognized arguments: {' '.join(extras)}{(command or self)._meant(extras)}")
        return parsed

    def _meant(self, extras: list[str]) -> str:
        options = [option for action in self._actions for option in action.option_strings if option.startswith("--")]
        for word in extras:
            name = word.split("=", 1)[0]
            if not name.startswith("--") or name in options:  # an option after `--` is a positional: no option to mean
                continue
            alias = OPTION_ALIASES.get(name)
            close = alias if alias in options else next(iter(difflib.get_close_matches(name, options, n=1, cutoff=0.75)), None)
            if close:
                return f"; did you mean {close}?"
        return ""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {self._dash_value_hint(message) or message} (see `{self.prog} --help`)\n")

    def _dash_value_hint(self, message: str) -> str | None:
        """`--budget -5s`: argparse reads a value that starts with '-' (and is not a plain negative number) as another
        option and says only "expected one argument". Say which value it was and how to pass it."""
        missing = re.fullmatch(r"argument (\S+): expected one argument", message)
        typed = getattr(self, "_arguments", [])
        for option in missing.group(1).split("/") if missing else ():
            # argparse reads from the left: a flag typed twice stopped at the first one without a value
            value = next((typed[i + 1] for i, word in enumerate(typed[:-1]) if word == option and typed[i + 1].startswith("-")), None)
            if value is not None and not self._names_an_option(value):
                return f"argument {option}: {value!r} starts with '-', so it reads as an option; write {option}={value} to give it as the value"
        return None

    def _names_an_option(self, word: str) -> bool:
        """Whether argparse takes `word` for one of this parser's options (`--out=x`, `--js` for --json, `--`): then the
        value was left out, and "expected one argument" says it right."""
        name = word.split("=", 1)[0]
        if word == "--" or name in self._option_string_actions:
            return True
        return self.allow_abbrev and word.startswith("--") and bool(self._get_option_tuples(word))


def build_parser() -> argparse.ArgumentParser:
    from thaw.cli import demo_cmd, lrfind_cmd, models_cmd, plan_cmd, report_cmd, train_cmd, use_cmds

    parser = OneLineParser(prog="thaw", description="Fine-tune pretrained PyTorch models the way experts do.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    plan_cmd.register(commands)
    models_cmd.register(commands)
    train_cmd.register(commands)
    use_cmds.register(commands)
    report_cmd.register(commands)
    lrfind_cmd.register(commands)
    demo_cmd.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _write_any_character()
    try:
        code = _run(argv)
        sys.stdout.flush()  # here, not at exit: a pipe's reader that is gone shows as below
        return code
    except KeyboardInterrupt:  # while Python was still loading torch and the commands: nothing had started
        if os.environ.get("RANK", "0") == "0":  # torchrun's ranks other than 0 stay quiet, as below
            print("thaw: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        if not _stdout_reader_gone():  # another pipe (a worker's, a logger's): an error like any other
            raise
        # `thaw models | head -1`: the reader has what it wanted. Python flushes stdout at exit: with nowhere to go,
        # that would fail again and print a warning.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # as a shell reports a process ended by SIGPIPE


def _write_any_character() -> None:
    """A class name, path or text the terminal's encoding lacks (PYTHONIOENCODING=ascii, a C or Latin-1 locale) is
    written escaped, as \\xe9: it was a UnicodeEncodeError traceback after the work was done. A UTF-8 stream writes a
    file name that is not UTF-8 as its own bytes (surrogateescape), where strict raised on it."""
    for stream in (sys.stdout, sys.stderr):
        if not isinstance(stream, io.TextIOWrapper):
            continue
        if codecs.lookup(stream.encoding).name != "utf-8":
            stream.reconfigure(errors="backslashreplace")
        elif stream.errors == "strict":
            stream.reconfigure(errors="surrogateescape")


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reading end is closed (poll says so; where poll is missing, as on Windows: no)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))  # Linux: ERR; macOS: HUP
    except (AttributeError, OSError, ValueError):
        return False


def _run(argv: list[str]) -> int:
    # Imported here, not with the module: they load torch (seconds), and a Ctrl-C meanwhile must end as main says.
    from thaw import distributed
    from thaw.train.fit import RunInterrupted

    try:
        # Inside the try: argparse turns only its own ArgumentTypeError into a usage line, and an
        # option's type may check its value with the library's own checks, which raise ThawError.
        args = build_parser().parse_args(argv)
        args.argv = argv  # which options were typed (thaw train --resume compares them with the run's own)
        return int(args.handler(args) or 0)
    except ThawError as error:
        print(f"thaw: error{_which_rank()}: {error}", file=sys.stderr)
        return 2
    except PermissionError as error:  # a folder or file of another user's (a shared server): one line, not a traceback
        print(f"thaw: error{_which_rank()}: {denied(error)}; check its permissions", file=sys.stderr)
        return 2
    except RunInterrupted as stopped:
        _say_once(f"thaw: {stopped}")
        return 128 + stopped.signal_number  # 130 after Ctrl-C, 143 after SIGTERM, as a shell reports a signal
    except KeyboardInterrupt:
        _say_once("thaw: interrupted")  # thaw train says itself whether there is a checkpoint
        return 130
    finally:
        distributed.stop()


def _say_once(message: str) -> None:
    """Under torchrun, Ctrl-C reaches every rank: rank 0 alone says what it left, for all of them."""
    from thaw import distributed

    try:
        main_rank = distributed.from_environment().is_main
    except ThawError:  # the launch variables are what is wrong: say it here, whatever this process is
        main_rank = True
    if main_rank:
        print(message, file=sys.stderr)


def _which_rank() -> str:
    """Under torchrun, say which process failed: torchrun stops the others and reports this one's exit."""
    from thaw import distributed

    try:
        processes = distributed.from_environment()
    except ThawError:  # the launch variables themselves are what is wrong; the error says so
        return ""
    return f" (rank {processes.rank} of {processes.world})" if processes.distributed else ""
