"""Numbers written as text: one pattern for what thaw reads as a decimal number, wherever it reads one (a plan
file's values, a budget, class names that are numbers)."""

from __future__ import annotations

import re

# ASCII digits only (with re.ASCII): float() also takes '1_0' and other scripts' digits ('٦٠٠'), which no one types
# as a number in a plan file or a label column. A sign, a point at either end, and an exponent, as float() writes.
DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)


def is_decimal(text: str) -> bool:
    """Whether `text`, blanks around it aside, is a decimal number as DECIMAL writes it."""
    return DECIMAL.fullmatch(text.strip(" \t\r\n\f\v")) is not None
