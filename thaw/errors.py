"""One exception type for every problem a user can fix.

The CLI turns a ThawError into a single line on stderr and a non-zero exit;
library callers can catch it. Messages say what is wrong and what to do.
"""

from __future__ import annotations

import re

_TERMINAL_CODES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # colours, clearing a line, moving the cursor


class ThawError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class WriteError(ThawError):
    """A file that could not be written where it was asked (a read-only folder): a caller may name another place."""


def join_problems(problems: list[str]) -> str:
    """Report every problem at once (torchtune-style), not just the first."""
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems: " + "; ".join(problems)


def denied(error: PermissionError) -> str:
    """A PermissionError in words: the path it names, where it names one."""
    return f"cannot access {error.filename} (permission denied)" if error.filename is not None else f"permission denied ({error})"


def first_line(error: BaseException, limit: int = 200) -> str:
    """What another library's exception says, fit for one line: its first line with a word in it, without terminal
    escape codes; its type where it says nothing readable (an empty file's EOFError has no message, a damaged
    pickle's may be a number); a long one up to the last sentence that fits in `limit` characters."""
    lines = [line.strip() for line in _TERMINAL_CODES.sub("", str(error)).splitlines()]
    readable = next((line for line in lines if re.search(r"[A-Za-z]", line)), None)
    if readable is None:
        shown = next((line for line in lines if line), "")
        readable = f"{type(error).__name__}: {shown}" if shown else type(error).__name__
    if len(readable) <= limit:
        return readable
    cut = readable[: limit - 4]  # at the last whole sentence that fits, else the last whole word, then " ..."
    end = cut.rfind(". ")
    if end >= limit // 2:  # not an "e.g. " early on
        return cut[: end + 1]
    words = readable[: limit - 3].rsplit(" ", 1)[0] if " " in cut else cut  # a space just past the cut keeps the word
    return words + " ..."
