"""Image data given as a table: tell a path,label manifest from a text table or a manifest with another header,
before the manifest reader takes every row for an image file."""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

from thaw.data.folders import is_listed_row
from thaw.data.images import IMAGE_SUFFIXES
from thaw.errors import ThawError

MANIFEST_HEADER = ["path", "label"]
ROWS_LOOKED_AT = 50  # enough to tell a manifest from a text table; a large table is not read whole


def check_image_table(data: str, text_hint: str) -> None:
    """Image data given as a table that is not a path,label manifest: one line that says so, before the manifest
    reader takes every row for an image and lists the texts as missing files (a 2.6 KB line, once). A header other
    than path,label would be taken as a row too. Anything else is left to the reader, which says what is wrong."""
    rows, delimiter = _first_rows(Path(data))
    if not rows or [cell.strip().lower() for cell in rows[0][:2]] == MANIFEST_HEADER:
        return
    shown = "<TAB>" if delimiter == "\t" else delimiter  # the columns as the user's file writes them
    first, header = _quoted(rows[0], shown), shown.join(MANIFEST_HEADER)
    if any(_names_file(Path(data), row) for row in rows[1:]) and not _names_file(Path(data), rows[0]):
        if not Path(rows[0][0].strip()).suffix:  # `filename`, not a missing photo.jpg (the reader names those)
            raise ThawError(f"{data}: an image manifest's header is {header}, this one's is {first}; rename its columns {header}")
    elif (not any(_names_file(Path(data), row) for row in rows) and not any(_names_an_image(row) for row in rows)
          and any(len(cell.split()) >= 3 for row in rows for cell in row)):  # rows that name photo.jpg: the reader names them missing
        raise ThawError(f"{data} is not an image manifest ({header} rows): its first row is {first}, as in a text table; {text_hint}")


def _first_rows(path: Path) -> tuple[list[list[str]], str]:
    """The first non-empty, non-comment rows of a table (tab-separated as thaw's text tables are sniffed) and the
    separator they were read with; no rows for a folder or an unreadable file, whose reader says why."""
    if not path.is_file():
        return [], ","
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            first = handle.readline()
            delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") or "\t" in first else ","
            rows = csv.reader(itertools.chain([first], handle), delimiter=delimiter)
            return list(itertools.islice(filter(is_listed_row, rows), ROWS_LOOKED_AT)), delimiter  # what the reader reads
    except (OSError, UnicodeDecodeError, csv.Error):
        return [], ","


def _names_file(manifest: Path, row: list[str]) -> bool:
    return (manifest.parent / row[0].strip()).is_file()  # where the manifest reader looks for it


def _names_an_image(row: list[str]) -> bool:
    """A first cell that names an image file (`my cat photo 1.jpg`), found or not: a manifest row, not a text."""
    return Path(row[0].strip()).suffix.lower() in IMAGE_SUFFIXES


def _quoted(row: list[str], separator: str, width: int = 40) -> str:
    text = separator.join(cell.strip() for cell in row[:2])
    return repr(text if len(text) <= width else text[: width - 3] + "...")
