"""Plots and tables of class names in any script: every label readable, every column in line."""

from __future__ import annotations

import warnings
from pathlib import Path

from thaw.plan.report import display_width, render_table
from thaw.train.plots import _plot_font, drawable, plot_confusion


def test_a_name_the_plot_font_lacks_is_drawn_escaped_and_two_such_names_stay_apart(tmp_path: Path) -> None:
    cat, dog = "\u732b", "\u72ac"  # 猫 and 犬: DejaVu Sans, matplotlib's font, has neither: both were the same empty box
    assert _plot_font().get_char_index(ord(cat)) == 0
    assert drawable(cat) == "\\u732b" and drawable(dog) == "\\u72ac"
    assert drawable("caf\u00e9 au lait") == "caf\u00e9 au lait"  # a character the font has stays as it is
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "Glyph ... missing from font(s)" warning, once per character
        assert plot_confusion([[1, 0], [0, 1]], [cat, dog], tmp_path / "confusion.png").stat().st_size > 0


def test_a_table_of_wide_and_accented_names_stays_in_line() -> None:
    rows = [["\u732b\u732b", "1"], ["cafe\u0301", "22"], ["dog", "333"]]  # two wide characters; e plus a combining accent
    assert [display_width(row[0]) for row in rows] == [4, 4, 3]
    lines = render_table(rows, ["class", "n"]).splitlines()
    assert len({display_width(line) for line in lines}) == 1  # every line as wide on screen as the header
    assert lines[2:] == ["\u732b\u732b     1", "cafe\u0301    22", "dog    333"]  # padded to "class", then "  ", then n


def test_a_name_with_a_tab_or_a_line_break_stays_on_one_line_and_draws_without_a_warning(tmp_path: Path) -> None:
    """A class named with a tab warned 'Glyph 9 missing from font(s)' on stderr; with a line break it split the table."""
    tab, lines = "tab\tx", "two\nlines"
    assert drawable(tab) == "tab\\tx" and drawable("a b") == "a b"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plot_confusion([[1, 0], [0, 1]], [tab, lines], tmp_path / "confusion.png").stat().st_size > 0
    table = render_table([[tab, "1"], [lines, "22"]], ["class", "n"]).splitlines()
    assert table[2:] == ["tab\\tx       1", "two\\nlines  22"] and len({display_width(line) for line in table}) == 1


def test_a_no_break_space_or_a_joined_emoji_stays_as_it_is_in_a_table() -> None:
    names = ["New\u00a0York", "\U0001f468\u200d\U0001f469\u200d\U0001f467"]
    assert render_table([[name, "1"] for name in names], ["class", "n"]).splitlines()[2].startswith("New\u00a0York")
    assert render_table([[names[1], "1"]], ["class", "n"]).splitlines()[2].startswith(names[1])
