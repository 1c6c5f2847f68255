"""Numbers written as text: one pattern for what thaw reads as a decimal number, wherever it reads one (a plan
file's values, a budget, class names that are numbers); and numbers passed from Python, of any real type."""

from __future__ import annotations

import numbers
import operator
import re

# ASCII digits only (with re.ASCII): float() also takes '1_0' and other scripts' digits ('٦٠٠'), which no one types
# as a number in a plan file or a label column. A sign, a point at either end, and an exponent, as float() writes.
DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)


def is_decimal(text: str) -> bool:
    """Whether `text`, blanks around it aside, is a decimal number as DECIMAL writes it."""
    return DECIMAL.fullmatch(text.strip(" \t\r\n\f\v")) is not None


def as_real(value: object) -> float | None:
    """`value` as a plain float where it is a real number of any type (numpy's np.float32 too, as a value read from an
    array is; a plan is written to JSON, which takes plain floats only), else None. A bool is no number here."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        return float(value)
    except OverflowError:  # a whole number no float holds (10**400, from a plan file): no number here either
        return None


def as_whole(value: object) -> int | None:
    """`value` as a plain int where it is a whole number of any integer type (numpy's too), else None (a bool, a
    float, a str): a plan and a run's record are JSON."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def short_repr(value: object, longest: int = 24) -> str:
    """repr(value), cut where it is longer than `longest` (a 400-digit number in a one-line message)."""
    text = repr(value)
    return text if len(text) <= longest else f"{text[:12]}... ({len(text)} characters)"
