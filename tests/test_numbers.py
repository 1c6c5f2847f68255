"""The one pattern thaw reads a decimal number written as text by: a plan file's values, a budget, number-named classes."""

from __future__ import annotations

import pytest

from thaw._numbers import is_decimal


@pytest.mark.parametrize(
    "text, value",
    [("0", 0), ("600", 600), ("+600", 600), ("-1.5", -1.5), ("1.", 1), (".5", 0.5), ("6e2", 600), ("1.5E+3", 1500), ("1e-07", 1e-7),
     (" 3 ", 3), ("\t0.1\n", 0.1)],
)
def test_what_reads_as_a_number(text: str, value: float) -> None:
    assert is_decimal(text) and float(text) == value  # the number float() reads from it, as every caller converts it


@pytest.mark.parametrize("text", ["", ".", "e3", "1e", "1_0", "\u0666\u0660\u0660", "nan", "inf", "0x10", "1,5", "1.2.3", "\u00a01"])
def test_what_does_not_though_float_may_take_it(text: str) -> None:
    """float() takes '1_0', Arabic-Indic digits, nan, inf and a no-break space around a number; none is a number typed here."""
    assert not is_decimal(text)
