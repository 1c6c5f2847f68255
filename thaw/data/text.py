"""Labelled text from a CSV or TSV table: read, check, split, tokenise, batch.

A table has one text column and one label column, chosen by name (with a
header) or by position. Without names, a header is recognised by its
column names, and in a two-column table the label column is the one with
few distinct values (SMS Spam Collection: `ham<TAB>text`). Tab-separated
files are read without quote handling, as the TSV convention has it: SMS
text is full of stray quotes.
"""

from __future__ import annotations

import csv
import itertools
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import Dataset, Sampler

from thaw._io import special_file
from thaw.data.folders import LabelledData, held_out_said, split_off_val, stratified_split
from thaw.data.loaders import Batch
from thaw.errors import ThawError
from thaw.distributed import SINGLE, Processes

TextSample = tuple[str, int]
TEXT_HEADERS = ("text", "sentence", "message", "sms", "review", "content")
LABEL_HEADERS = ("label", "labels", "class", "category", "target", "sentiment", "intent", "topic")
REPEATS_SHARE = 0.01  # of a held-out split, found in train: below it, a few recurring short texts are no leak to speak of
OPEN_QUOTE_LINES = 2  # line ends inside one row, for an error to name it as a quote perhaps left open
SWALLOWED_ROWS = 3  # lines of one text that read as rows of the table: past this, a quote was surely left open
LENGTH_GROUP_BATCHES = 50  # batches per length-sorted chunk (the HF Trainer's group_by_length uses 50 too)
# How a table is split into train, val and test, as a run records it (`split_rule` in thaw.json): today's rule, and
# the rules runs were made with before, rebuilt for them so that they resume and score on the split they trained on.
# Each names the shares of a label a split's copies are held out within (rows of one text go to one split), or that
# copies go anywhere (row-by-row, the first rule).
SPLIT_RULE = "copies-within-rows-and-texts"
SPLIT_RULES = (SPLIT_RULE, "copies-within-rows", "copies-within-texts", "row-by-row")
SPLIT_WITHIN = {  # the shares stratified_split holds to: row by row, a group is one row, so rows and groups are one share
    SPLIT_RULE: ("samples", "groups"), "copies-within-rows": ("samples",), "copies-within-texts": ("groups",), "row-by-row": ("samples", "groups"),
}
# Runs that recorded `copies_together: true` (before split_rule) were split by one of these, newest first: three
# versions of thaw wrote the same key. The samples the run recorded tell which (thaw.train.settings.split_as_recorded).
COPIES_TOGETHER_RULES = (SPLIT_RULE, "copies-within-rows", "copies-within-texts")


@dataclass(frozen=True)
class TextColumns:
    """Which columns hold the text and the label: a name, a 0-based position, or None to infer."""

    text: str | int | None = None
    label: str | int | None = None
    delimiter: str | None = None  # None: tab for .tsv/.tab or tab-separated first line, else comma


class TextData(LabelledData):
    """Samples are (text, class index); skipped lists (file:line, reason)."""


def _delimiter(path: Path, first_line: str, wanted: str | None) -> str:
    if wanted is not None:  # "" too: an unset shell variable (--delimiter "$SEP") is refused, not read as "sniff it"
        chosen = "\t" if wanted in ("tab", "\\t") else wanted
        if len(chosen) != 1:
            raise ThawError(f"delimiter (--delimiter) must be one character (or tab), got {wanted!r}")
        return chosen
    if path.suffix.lower() in (".tsv", ".tab") or "\t" in first_line:
        return "\t"
    return ","


def read_rows(path: Path, delimiter: str | None) -> tuple[list[list[str]], list[int], str]:
    """All non-empty rows of the table, the line each starts on, and the delimiter used.

    `csv` reads the file object itself (newline=""), so a quoted CSV field may span lines, and
    only a line feed or carriage return ends a row: a vertical tab, a file separator or a Unicode
    line separator inside a text stays in the text (str.splitlines() would cut the row there).
    """
    csv.field_size_limit(sys.maxsize)
    rows, lines = [], []
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            first_line = handle.readline()  # the delimiter is sniffed from it, then it is read again as a row
            chosen = _delimiter(path, first_line, delimiter)
            quoting = csv.QUOTE_NONE if chosen == "\t" else csv.QUOTE_MINIMAL
            reader = csv.reader(itertools.chain([first_line], handle), delimiter=chosen, quoting=quoting)
            starts = 1
            for row in reader:
                if any(cell.strip() for cell in row):
                    rows.append(row)
                    lines.append(starts)
                starts = reader.line_num + 1
    except UnicodeDecodeError:
        raise ThawError(f"{path} is not UTF-8 text (byte {_first_bad_byte(path)}); save it as UTF-8 CSV or TSV") from None
    except csv.Error as error:
        raise ThawError(f"{path}: unreadable table ({error}); check its quotes, or pass a delimiter (--delimiter)") from None
    if not rows:
        raise ThawError(f"{path} is empty; expected one text and one label per line")
    return rows, lines, chosen


def _first_bad_byte(path: Path) -> int:
    """Where UTF-8 decoding fails, counted from the file's start (a streaming decoder counts per chunk)."""
    try:
        path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        return error.start
    return 0


def _column_index(header: list[str] | None, wanted: str | int, what: str, path: Path) -> int:
    if isinstance(wanted, int) and (wanted < 0 or isinstance(wanted, bool)):  # -1 would count from the end: another column
        raise ThawError(f"{path}: the {what} column (TextColumns.{what}, --{what}-column) {wanted!r} is no column; positions count from 0, or name the column")
    if isinstance(wanted, int) or (isinstance(wanted, str) and wanted.isdigit()):
        return int(wanted)
    names = [cell.strip() for cell in header or []]
    if wanted not in names:
        shown = ", ".join(names) if names else "none: the file has no header row"
        raise ThawError(f"{path}: no {what} column named {wanted!r}; columns are {shown}. Name one with TextColumns.{what} (--{what}-column)")
    return names.index(wanted)


def _guess_columns(rows: list[list[str]], header: list[str] | None, path: Path, delimiter: str, quote_hint: str = "") -> tuple[int, int]:
    """(text, label) positions: header names first, else the column with the fewest distinct values is the label."""
    text = label = None
    if header:
        lowered = [cell.strip().lower() for cell in header]
        text = next((i for i, n in enumerate(lowered) if n in TEXT_HEADERS), None)
        label = next((i for i, n in enumerate(lowered) if n in LABEL_HEADERS), None)
        if text is not None and label is not None:
            return text, label
    sample = rows[:1000]
    width = Counter(len(row) for row in sample).most_common(1)[0][0]  # a broken line must not decide
    sample = [row for row in sample if len(row) == width]
    if width < 2:
        shown = "tab" if delimiter == "\t" else repr(delimiter)
        raise ThawError(f"{path}: the table needs a text column and a label column; split by {shown}, it has one (another delimiter? TextColumns.delimiter, --delimiter){quote_hint}")
    # A column the header names stays what it names (review,sentiment: the review is the text even where it has
    # fewer distinct values than the sentiment); the other is guessed among the rest.
    distinct = [len({row[i] for row in sample}) for i in range(width)]
    if label is None:
        label = min((i for i in range(width) if i != text), key=lambda i: distinct[i])
    lengths = [sum(len(row[i]) for row in sample) for i in range(width)]
    if text is None:
        text = max((i for i in range(width) if i != label), key=lambda i: lengths[i])
    return text, label


def read_table(path: str | Path, columns: TextColumns = TextColumns()) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(text, label name) pairs, and the lines skipped with a reason."""
    table = _read_table(Path(path), columns)
    return table.pairs, table.skipped


@dataclass(frozen=True)
class Table:
    """A table as read: (text, label name) pairs, the lines skipped with a reason, what looked wrong (rows an unclosed
    quote swallowed), and the first row read as data, with its line, where no header was recognised and that row
    gave the first pair (a header of other names)."""

    pairs: list[tuple[str, str]]
    skipped: list[tuple[str, str]]
    cautions: tuple[str, ...]
    unnamed_first_row: tuple[int, list[str]] | None = None
    open_quote: str = ""  # the row of most lines (2 or more), for an error about too few labels: a quote may be why


def _read_table(path: Path, columns: TextColumns) -> Table:
    """read_table, and what it found suspicious."""
    if path.is_dir():  # an image folder, given to a text run (or to --task text)
        raise ThawError(f"{path} is a folder; text data is one CSV or TSV table of texts and labels")
    special = special_file(path)
    if special:  # a table piped in by <(...): read once, it could not be read again on a resume
        raise ThawError(f"text data {path} is {special}, not a regular file; save the table as a CSV or TSV file and pass that")
    if not path.is_file():
        raise ThawError(f"text data {path} does not exist; pass a CSV or TSV file")
    rows, lines, delimiter = read_rows(path, columns.delimiter)
    named = any(isinstance(c, str) and not c.isdigit() for c in (columns.text, columns.label))
    has_header = named or any(cell.strip().lower() in TEXT_HEADERS + LABEL_HEADERS for cell in rows[0])
    header, body, lines = (rows[0], rows[1:], lines[1:]) if has_header else (None, rows, lines)
    if not body:
        raise ThawError(f"{path} has a header but no rows")
    spanning = _rows_spanning_lines(body, lines, delimiter)
    quote_hint = _open_quote(spanning)
    guessed = _guess_columns(body, header, path, delimiter, quote_hint) if columns.text is None or columns.label is None else (0, 0)
    text_at = guessed[0] if columns.text is None else _column_index(header, columns.text, "text", path)
    label_at = guessed[1] if columns.label is None else _column_index(header, columns.label, "label", path)
    widest = max(len(row) for row in body)
    for what, at in (("text", text_at), ("label", label_at)):
        if at >= widest:
            raise ThawError(f"{path}: the {what} column (TextColumns.{what}, --{what}-column) {at} is past its last column (the table has {widest}: 0 to {widest - 1}){quote_hint}")
    if text_at == label_at:
        raise ThawError(f"{path}: the text and the label are the same column ({text_at}); give them different columns (TextColumns text and label, --text-column and --label-column)")
    # The header's width, or the rows' usual width where wider (text,label over rows with an unnamed score column).
    usual = Counter(len(_filled(row)) for row in body).most_common(1)[0][0]
    columns_count = max(len(_filled(header)), usual) if header else usual
    columns_count = max(columns_count, text_at + 1, label_at + 1)  # columns named past it are the user's word
    pairs, skipped, starts = [], [], []
    for line, row in zip(lines, body):
        if len(_filled(row)) > columns_count:  # the text's own delimiter, unquoted: a cell of it could pass as the label
            shown = "tab" if delimiter == "\t" else repr(delimiter)
            skipped.append((
                f"{path}:{line}",
                f"{len(_filled(row))} columns, the table has {columns_count}: a {shown} inside a text? quote the text",
            ))
        elif max(text_at, label_at) >= len(row):
            spans = spanning.get(line)
            quote = f"; a quote opened on this line runs over {spans} more line(s)" if spans else ""
            skipped.append((f"{path}:{line}", f"{len(row)} column(s), expected at least {max(text_at, label_at) + 1}{quote}"))
        elif not row[text_at].strip() or not row[label_at].strip():
            skipped.append((f"{path}:{line}", "empty text or label"))
        else:
            pairs.append((row[text_at], row[label_at].strip()))
            starts.append(line)
    width = Counter(len(row) for row in body).most_common(1)[0][0]
    labels = {label for _, label in pairs}
    cautions = _swallowed_rows([(line, row) for line, row in zip(lines, body) if line in spanning], labels, path, delimiter, width, label_at)
    first_row = (lines[0], body[0]) if not has_header and starts[:1] == lines[:1] else None
    return Table(pairs, skipped, cautions, first_row, quote_hint)


def _filled(row: list[str]) -> list[str]:
    """The row without its empty trailing cells (`text,label,`: a trailing delimiter, no third column)."""
    end = len(row)
    while end and not row[end - 1].strip():
        end -= 1
    return row[:end]


def _physical_lines(text: str) -> list[str]:
    """`text` cut at line ends only, as the table reader cuts rows (str.splitlines() also cuts at a vertical tab or a
    Unicode line separator, which stay inside a row); a quote left open to the file's end holds its last line end."""
    return re.split(r"\r\n|\r|\n", text.rstrip("\r\n"))


def _rows_spanning_lines(body: list[list[str]], lines: list[int], delimiter: str) -> dict[int, int]:
    """{line a row starts on: the line ends inside it}, for the rows that hold one (quoted cells); the rest are not
    looked at twice, since a large table is mostly one-line rows."""
    return {
        line: len(_physical_lines(delimiter.join(row))) - 1
        for line, row in zip(lines, body) if any("\n" in cell or "\r" in cell for cell in row)
    }


def _open_quote(spanning: dict[int, int]) -> str:
    """For an error about the table's shape or its labels: the row that spans the most lines, where it spans
    OPEN_QUOTE_LINES or more. A quote left open swallows the rest of the file, or up to the next quote, into one
    cell: a row of many lines. A text of two lines (a letter's greeting) is not named."""
    if not spanning:
        return ""
    line = max(spanning, key=spanning.__getitem__)
    if spanning[line] < OPEN_QUOTE_LINES:
        return ""
    return f"; line {line} opens a quote that runs over {spanning[line]} more line(s): close it if it was left open"


def _swallowed_rows(
    rows: list[tuple[int, list[str]]], labels: set[str], path: Path, delimiter: str, width: int, label_at: int
) -> tuple[str, ...]:
    """A quote opened and never closed (`ham,"Hello`) makes csv read every line after it, up to the next quote or
    the end of the file, as part of that one row: those rows are lost, and one long text is trained on (or the row
    is skipped, short of columns). Said where a row's lines after its first read as rows of the table themselves
    (its width, a known label in the label column): two or more, and all of them or SWALLOWED_ROWS. A text that
    merely spans lines (an address, a review that ends `I give it 10/10, 1`) is not, even if one of its lines
    happens to read as a row."""
    found = []
    for line, row in rows:
        spanned = _physical_lines(delimiter.join(row))[1:]
        inner = [part for part in spanned if part.strip()]
        as_rows = [cells for cells in csv.reader(inner, delimiter=delimiter) if len(cells) == width and label_at < width]
        count = sum(1 for cells in as_rows if cells[label_at].strip() in labels)
        if count >= 2 and (count == len(inner) or count >= SWALLOWED_ROWS):
            found.append((line, len(spanned), count))
    if not found:
        return ()
    line, spans, count = found[0]
    more = f" ({len(found) - 1} more such row(s) after it)" if len(found) > 1 else ""
    return (
        f"{path}:{line}: a quote opened in this row runs over {spans} more line(s), {count} of which read as rows of their "
        f"own, so they are read as part of this one row{more}; close the quote, or save the table as TSV (read "
        "without quotes)",
    )


def _classes(table: Table, path: Path) -> tuple[str, ...]:
    pairs = table.pairs
    counts = Counter(label for _, label in pairs)
    also = f"; {table.cautions[0]}" if table.cautions else table.open_quote  # rows a quote swallowed may be why
    if len(counts) < 2:
        raise ThawError(f"{path} has {len(counts)} label value(s) ({', '.join(counts)}); classification needs at least 2{also}")
    if len(counts) > max(100, len(pairs) // 2):
        raise ThawError(f"{path}: {len(counts)} distinct labels in {len(pairs)} rows; is the label column (TextColumns.label, --label-column) the right one?{also}")
    few = [name for name, count in counts.items() if count < 2]
    if few:
        first = table.unnamed_first_row  # a header of names thaw does not know (`msg,tag`) is read as a row
        hint = "" if first is None or pairs[0][1] not in few else (
            f"; if line {first[0]} ({', '.join(first[1])}) is a header, name its columns with --text-column and --label-column (TextColumns in Python)"
        )
        raise ThawError(f"{path}: label(s) {', '.join(few[:5])} occur once; each class needs 2 rows to be split into train and val{hint}{also}")
    return tuple(sorted(counts))


def load_text_data(
    path: str | Path, *, columns: TextColumns = TextColumns(), val_split: float = 0.2, test_split: float = 0.0, seed: int = 0,
    split_rule: str = SPLIT_RULE,
) -> TextData:
    """Read the table, then hold out a seeded stratified test share, then a val share of the rest. By SPLIT_RULE the
    rows of one text (its copies, spaces at its ends aside) go to one split, so that no val or test text is also
    trained on; the earlier rules of SPLIT_RULES rebuild the splits of runs made with them."""
    if not 0 <= test_split < 1:  # checked here, not by the split, which would name val_split
        raise ThawError(f"test_split (--test-split) must be from 0 (none held out) and below 1, like 0.2, got {test_split}")
    if split_rule not in SPLIT_RULES:
        raise ThawError(f"unknown split rule {split_rule!r}; use one of {', '.join(SPLIT_RULES)}")
    path = Path(path)
    table = _read_table(path, columns)
    pairs, skipped, cautions = table.pairs, table.skipped, table.cautions
    classes = _classes(table, path)
    index = {name: i for i, name in enumerate(classes)}
    samples = [(text, index[label]) for text, label in pairs]
    same = None if split_rule == "row-by-row" else _text_of
    within = SPLIT_WITHIN[split_rule]
    test = None
    if test_split:
        samples, held = stratified_split(samples, test_split, seed, same, within)
        test = tuple(held)
    rows_left = " once the test share is held out" if test_split else ""
    train, val = split_off_val(samples, val_split, seed, path, rows_left, same=same, within=within)
    # the shares really held out where whole rows (whole texts, copies together) per label put them far from those asked
    whole = "texts per label" if same else "rows per label"
    val_said = held_out_said(val_split, len(train), len(val), "val held out", whole)
    held_out = f"{held_out_said(test_split, len(samples), len(test or ()), 'test', whole)} then {val_said}" if test_split else val_said
    layout = f"text table, {held_out} (seed {seed}){_copies_said(pairs) if same else ''}"
    cautions += _repeated_texts(train, val, test) + _labels_not_held_out(classes, val, test)
    return TextData(classes, tuple(train), tuple(val), test, layout, tuple(skipped), cautions=cautions)


def recorded_split_rules(recorded: dict | None, source: str) -> tuple[str, ...]:
    """The split rules a run's settings (or thaw.json, named by `source`) say it may have been made with: the one
    `split_rule` names; before it was recorded, the three that wrote `copies_together: true`; before that, nothing
    (row by row). A rule this thaw does not know (a newer thaw's, or a damaged file) is one line."""
    recorded = recorded or {}
    if "split_rule" not in recorded:
        return COPIES_TOGETHER_RULES if recorded.get("copies_together") is True else ("row-by-row",)
    rule = recorded["split_rule"]
    if rule not in SPLIT_RULES:
        raise ThawError(
            f"{source} records split_rule {rule!r}, which this thaw does not know ({', '.join(SPLIT_RULES)}): it was "
            "written by a newer thaw, or damaged; use the thaw that made the run"
        )
    return (rule,)


def _text_of(sample: tuple[str, object]) -> str:
    return sample[0].strip()


def _copies_said(pairs: list[tuple[str, str]]) -> str:
    """For the data line: how many rows repeat a text of their label (kept in one split with it), if any."""
    copies = len(pairs) - len({(_text_of(pair), pair[1]) for pair in pairs})
    if not copies:
        return ""
    return f"; {copies} row{'s' if copies > 1 else ''} repeat{'' if copies > 1 else 's'} a text of {'their' if copies > 1 else 'its'} label, kept in one split with it"


def _labels_not_held_out(classes: tuple[str, ...], val: list[TextSample], test: tuple[TextSample, ...] | None) -> tuple[str, ...]:
    """Labels a held-out split has no row of: a label of too few different texts (one text copied, whose copies are
    kept together; or two with a test share, the test taking one) keeps them in train."""
    found = []
    lower = " or lower --test-split" if test is not None else ""
    for name, held in (("val", val), ("test", test)):
        if held is None:
            continue
        present = {label for _, label in held}
        missing = [classes[index] for index in range(len(classes)) if index not in present]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            found.append(
                f"{name} has no row of label(s) {', '.join(missing[:5])}{more}: they have too few "
                f"different texts to hold one out for each split, so {name} scores say nothing of them; add more texts of them{lower}"
            )
    return tuple(found)


def _repeated_texts(train: list[TextSample], val: list[TextSample], test: tuple[TextSample, ...] | None) -> tuple[str, ...]:
    """Texts held out for val or test that also sit in train, where they are REPEATS_SHARE of the split or more (a
    table with repeated rows: the SMS collection has hundreds): those scores are then partly scores on training data,
    too high. Said, not removed: short texts (`ok`, `thanks`) may recur on purpose, and the table is the user's. With
    copies kept together only a text under two labels can be on both sides."""
    seen = {text.strip() for text, _ in train}
    found = []
    for name, held in (("val", val), ("test", test or ())):
        repeated = sum(1 for text, _ in held if text.strip() in seen)
        if repeated and repeated >= REPEATS_SHARE * len(held):
            found.append(
                f"{repeated} of the {len(held)} {name} texts also appear in train (repeated rows in the table), so {name} "
                "scores are partly scores on training data; if they are copies, remove them for a fair score"
            )
    return tuple(found)


class TextDataset(Dataset):
    """Token ids per sample, computed once with the model's own tokenizer (truncated, not padded)."""

    def __init__(self, samples: tuple[TextSample, ...], tokenizer: object, max_length: int) -> None:
        self.samples = samples
        self.tokenizer = tokenizer
        encoded = tokenizer([text for text, _ in samples], truncation=True, max_length=max_length)
        self.features = [{key: encoded[key][i] for key in encoded} for i in range(len(samples))]
        self.lengths = [len(ids) for ids in encoded["input_ids"]]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[dict, int, None]:
        return self.features[index], self.samples[index][1], None

    def batch_sampler(self, batch_size: int, seed: int | None, skip_batches: int, processes: Processes = SINGLE) -> Sampler[list[int]]:
        return LengthGroupedBatches(self.lengths, batch_size, seed, skip_batches, processes)

    def collate(self, items: list[tuple[dict, int, None]]) -> Batch:
        """Dynamic padding: each batch is padded to its own longest sample."""
        padded = self.tokenizer.pad([features for features, _, _ in items], return_tensors="pt")
        return Batch(dict(padded), torch.tensor([label for _, label, _ in items]), [])


class LengthGroupedBatches(Sampler[list[int]]):
    """Seeded shuffle, then batches of similar length (less padding), in shuffled order.

    Like the HF Trainer's group_by_length: the shuffled order is cut into chunks
    of LENGTH_GROUP_BATCHES batches, each chunk sorted by length, and the batches
    shuffled again. `skip_batches` drops the first batches, to resume mid-epoch.
    """

    def __init__(
        self, lengths: list[int], batch_size: int, seed: int | None, skip_batches: int = 0, processes: Processes = SINGLE
    ) -> None:
        self.lengths, self.batch_size, self.seed, self.skip = lengths, batch_size, seed, skip_batches
        self.processes = processes
        self._mine: list[list[int]] | None = None

    def _my_share(self, batches: list[list[int]]) -> list[list[int]]:
        """Under several processes, every rank's batches: training pads so all ranks step equally often."""
        world, rank = self.processes.world, self.processes.rank
        if world == 1:
            return batches
        if self.seed is not None and len(batches) % world:
            batches = batches + batches[: world - len(batches) % world]
        return batches[rank::world]

    def batches(self) -> list[list[int]]:
        count = len(self.lengths)
        if self.seed is None:  # evaluation: sorted by length, the least padding
            order = sorted(range(count), key=lambda i: self.lengths[i])
            return [order[i : i + self.batch_size] for i in range(0, count, self.batch_size)]
        rng = random.Random(self.seed)
        order = list(range(count))
        rng.shuffle(order)
        chunk = self.batch_size * LENGTH_GROUP_BATCHES
        batches = []
        for start in range(0, count, chunk):
            part = sorted(order[start : start + chunk], key=lambda i: self.lengths[i], reverse=True)
            batches += [part[i : i + self.batch_size] for i in range(0, len(part), self.batch_size)]
        rng.shuffle(batches)
        return batches

    def mine(self) -> list[list[int]]:
        """This rank's batches for the epoch, worked out once (len() is asked for often)."""
        if self._mine is None:
            self._mine = self._my_share(self.batches())[self.skip :]
        return self._mine

    def __len__(self) -> int:
        return len(self.mine())

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.mine())
