"""One exception type for every problem a user can fix.

The CLI turns a ThawError into a single line on stderr and a non-zero exit;
library callers can catch it. Messages say what is wrong and what to do.
"""

from __future__ import annotations


class ThawError(Exception):
    """A problem with the user's input or environment, explained in one line."""


def join_problems(problems: list[str]) -> str:
    """Report every problem at once (torchtune-style), not just the first."""
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems: " + "; ".join(problems)
