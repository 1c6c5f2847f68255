"""Reading labelled text tables: columns, headers, delimiters, splits, bad input, length-grouped batches."""

from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import shared_data
from thaw.data.text import SPLIT_RULE, SPLIT_RULES, LengthGroupedBatches, TextColumns, load_text_data, read_table, recorded_split_rules
from thaw.errors import ThawError
from thaw.train.settings import samples_digest


def test_sms_collection_reads_every_message_with_the_label_column_inferred() -> None:
    pairs, skipped = read_table(shared_data("sms_spam/SMSSpamCollection"))
    assert len(pairs) == 5574 and not skipped
    assert Counter(label for _, label in pairs) == {"ham": 4827, "spam": 747}
    # Quotes inside messages stay text: no line swallowed the next one.
    assert all("\t" not in text and "\n" not in text for text, _ in pairs)


def test_test_split_is_seeded_stratified_and_disjoint() -> None:
    data = load_text_data(shared_data("sms_spam/SMSSpamCollection"), val_split=0.1, test_split=0.2, seed=0)
    again = load_text_data(shared_data("sms_spam/SMSSpamCollection"), val_split=0.1, test_split=0.2, seed=0)
    assert data.test == again.test and data.train == again.train
    # Copies kept together: each label's test share keeps within its share of rows and of different texts (ham's
    # texts bind, 904 of 4,518; spam's rows, 149 of 747 in 124 texts).
    for name, rows, texts in (("ham", 4827, 4518), ("spam", 747, 642)):
        held = [text.strip() for text, label in data.test if data.classes[label] == name]
        assert 0.9 * round(texts * 0.2) < len(set(held)) <= round(texts * 0.2) and len(held) <= round(rows * 0.2)
    assert not {text.strip() for text, _ in data.test} & {text.strip() for text, _ in data.train + data.val}
    spam = data.classes.index("spam")
    assert abs(sum(label == spam for _, label in data.test) / len(data.test) - 747 / 5574) < 0.002
    assert len(data.train) + len(data.val) + len(data.test) == 5574


def test_csv_with_header_names_and_quoted_commas(tmp_path: Path) -> None:
    table = tmp_path / "reviews.csv"
    table.write_text('id,review,sentiment\n1,"good, really good",pos\n2,"bad, not good",neg\n3,fine,pos\n4,awful,neg\n')
    pairs, _ = read_table(table, TextColumns(text="review", label="sentiment"))
    assert pairs[0] == ("good, really good", "pos") and len(pairs) == 4
    by_position, _ = read_table(table, TextColumns(text=1, label=2))
    assert by_position == pairs


def test_a_quoted_csv_field_may_span_lines(tmp_path: Path) -> None:
    table = tmp_path / "t.csv"  # as Excel saves it: a byte order mark, CRLF line ends
    table.write_text('\ufefflabel,text\r\nspam,"win a prize\r\ncall now, today"\r\nham,see you\r\nspam,free\r\nham,ok\r\n', newline="")
    pairs, skipped = read_table(table)
    assert pairs == [("win a prize\r\ncall now, today", "spam"), ("see you", "ham"), ("free", "spam"), ("ok", "ham")] and not skipped


def test_only_line_feeds_and_carriage_returns_end_a_row(tmp_path: Path) -> None:
    """Vertical tab, file separator and Unicode line separator are text (str.splitlines() cut rows there)."""
    table = tmp_path / "t.tsv"
    texts = ["free\u2028prize", "hi\x0bthere", "call\x1cnow", 'a "quoted" word']
    table.write_text("".join(f"{label}\t{text}\n" for label, text in zip(["spam", "ham", "spam", "ham"], texts)), encoding="utf-8")
    pairs, skipped = read_table(table)
    assert [text for text, _ in pairs] == texts and not skipped


def test_header_is_recognised_without_names(tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    table.write_text("label,text\na,one thing\nb,another thing\na,more\nb,less\n")
    pairs, _ = read_table(table)
    assert pairs[0] == ("one thing", "a")


def test_unknown_column_names_the_columns(tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    table.write_text("label,body\na,x\nb,y\n")
    with pytest.raises(ThawError, match="no text column named 'text'; columns are label, body"):
        read_table(table, TextColumns(text="text", label="label"))


def test_a_column_past_the_last_or_text_and_label_in_one_column_is_refused(tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    table.write_text("a,one thing\nb,another\na,more\nb,less\n")
    with pytest.raises(ThawError, match=r"the label column \(TextColumns.label, --label-column\) 7 is past its last column \(the table has 2: 0 to 1\)"):
        read_table(table, TextColumns(text=1, label=7))
    with pytest.raises(ThawError, match=r"the text and the label are the same column \(0\)"):
        read_table(table, TextColumns(text=0, label=0))  # would train on the answer itself
    with pytest.raises(ThawError, match=r"t.csv: the text column \(TextColumns.text, --text-column\) -1 is no column; positions count from 0, or name the column$"):
        read_table(table, TextColumns(text=-1, label=0))  # counted from the end: the label column, trained on as text


def test_a_table_of_one_column_names_the_file_and_the_delimiter(tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    table.write_text("hello\tthere friend,greeting\nbye now,farewell\nhi,greeting\nsee you,farewell\n")  # a tab in the first text: read as TSV
    with pytest.raises(ThawError, match=r"t.csv: the table needs a text column and a label column; split by tab, it has one \(another delimiter\? TextColumns.delimiter, --delimiter\)$"):
        read_table(table)
    assert read_table(table, TextColumns(delimiter=","))[0][1] == ("bye now", "farewell")


def test_short_and_empty_rows_are_skipped_with_their_line(tmp_path: Path) -> None:
    table = tmp_path / "t.tsv"
    table.write_text("a\tone\nb\ttwo\nbroken line\na\t \na\tthree\nb\tfour\n")
    pairs, skipped = read_table(table)
    assert len(pairs) == 4
    assert [where.rsplit(":", 1)[1] for where, _ in skipped] == ["3", "4"]


def test_a_column_the_header_names_stays_what_it_names_when_the_other_is_guessed(tmp_path: Path) -> None:
    """review,stars: the review column has fewer distinct values than the stars here, and was taken as the label."""
    table = tmp_path / "t.csv"
    rows = [("great product", "5"), ("great product", "4"), ("terrible service", "1"), ("terrible service", "2"), ("great product", "3")]
    table.write_text("review,stars\n" + "".join(f"{text},{stars}\n" for text, stars in rows * 2))
    pairs, _ = read_table(table)
    assert sorted({label for _, label in pairs}) == ["1", "2", "3", "4", "5"] and pairs[0] == ("great product", "5")
    table.write_text("category,comment\n" + "".join(f"{'ham' if i % 2 else 'spam'},message number {i}\n" for i in range(6)))
    assert read_table(table)[0][0] == ("message number 0", "spam")  # a recognised label header: the other column is the text


def test_a_row_with_more_columns_than_the_table_is_skipped_not_read_as_a_new_label(tmp_path: Path) -> None:
    """An unquoted comma inside a text: its second half was read as the label, a class of its own, without a word."""
    table = tmp_path / "t.csv"
    table.write_text("text,label\nhello,ham\nwin now,spam\nurgent prize, ok then,spam\nhi,ham,\nfree cash,spam\n")
    pairs, skipped = read_table(table)
    assert sorted({label for _, label in pairs}) == ["ham", "spam"] and ("hi", "ham") in pairs  # a trailing comma is no column
    assert skipped == [(f"{table}:4", "3 columns, the table has 2: a ',' inside a text? quote the text")]
    table.write_text("text,label\nhello there,ham,0.9\nwin now,spam,0.1\nsee you,ham,0.8\n")  # a header shorter than its rows
    assert read_table(table) == ([("hello there", "ham"), ("win now", "spam"), ("see you", "ham")], [])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("a\tone\na\ttwo\n", "1 label value"),
        ("a\tone\nb\ttwo\nb\tthree\n", "label\\(s\\) a occur once"),
        ("", "is empty"),
        ("\n\n \n", "is empty"),
    ],
)
def test_unusable_tables_are_one_clear_error(tmp_path: Path, content: str, message: str) -> None:
    table = tmp_path / "t.tsv"
    table.write_text(content)
    with pytest.raises(ThawError, match=message):
        load_text_data(table)


def test_a_test_share_that_leaves_no_val_row_is_refused(tmp_path: Path) -> None:
    """Two rows a class, one taken as test: none left for val, which chose epochs by nothing (then a traceback)."""
    table = tmp_path / "t.tsv"
    table.write_text("a\tone\nb\tone\nc\ttwo\nd\ttwo\n")
    with pytest.raises(ThawError, match="t.tsv: no sample is left for val: every class has a single one once the test share is held out; a class needs 3 at the least, one each to train on, validate and test; or lower --test-split"):
        load_text_data(table, test_split=0.5)
    assert len(load_text_data(table).val) == 2  # without the test share: one val row a class


def test_non_utf8_file_is_refused(tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    table.write_bytes("label,text\na,caf\xe9\n".encode("latin-1"))
    with pytest.raises(ThawError, match="not UTF-8"):
        read_table(table)
    # Past the reader's first chunk, the byte named is still counted from the start of the file.
    lines = "label,text\n" + "a,plain text\n" * 5000
    table.write_bytes(lines.encode() + "b,caf\xe9\n".encode("latin-1"))
    with pytest.raises(ThawError, match=f"not UTF-8 text \\(byte {len(lines) + 5}\\)"):
        read_table(table)


def test_a_delimiter_of_several_characters_is_one_line(tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    table.write_text("a;;one\nb;;two\n")
    with pytest.raises(ThawError, match=r"delimiter \(--delimiter\) must be one character"):
        read_table(table, TextColumns(delimiter=";;"))
    with pytest.raises(ThawError, match=r"^delimiter \(--delimiter\) must be one character \(or tab\), got ''$"):
        read_table(table, TextColumns(delimiter=""))  # an unset shell variable: not "find it out"


def test_length_grouped_batches_cover_each_sample_once_and_cut_padding() -> None:
    import random

    rng = random.Random(1)
    lengths = [rng.randint(3, 120) for _ in range(1000)]
    sampler = LengthGroupedBatches(lengths, 16, seed=5)
    batches = list(sampler)
    assert sorted(i for batch in batches for i in batch) == list(range(1000))
    assert batches == list(LengthGroupedBatches(lengths, 16, seed=5)) != list(LengthGroupedBatches(lengths, 16, seed=6))
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    order = list(range(1000))
    rng.shuffle(order)
    random_padded = sum(16 * max(lengths[i] for i in order[s : s + 16]) for s in range(0, 1000, 16))
    assert padded < 0.7 * random_padded
    assert list(LengthGroupedBatches(lengths, 16, seed=5, skip_batches=3)) == batches[3:]


def test_length_grouped_batches_split_evenly_across_ranks() -> None:
    from thaw.distributed import Processes

    lengths = [(i * 37) % 90 + 3 for i in range(203)]
    shares = [list(LengthGroupedBatches(lengths, 16, seed=2, processes=Processes(rank, 3))) for rank in range(3)]
    assert len({len(share) for share in shares}) == 1  # every rank takes as many steps
    seen = [i for share in shares for batch in share for i in batch]
    assert set(seen) == set(range(203))  # together they cover the epoch (a few batches repeat as padding)
    evaluation = [list(LengthGroupedBatches(lengths, 16, seed=None, processes=Processes(rank, 3))) for rank in range(3)]
    assert sorted(i for share in evaluation for batch in share for i in batch) == list(range(203))  # exact, no padding


def test_a_folder_or_a_missing_file_given_as_text_data_is_named_as_such(tmp_path: Path) -> None:
    with pytest.raises(ThawError, match=f"^{tmp_path} is a folder; text data is one CSV or TSV table of texts and labels$"):
        read_table(tmp_path)  # an image folder, given to a text run
    with pytest.raises(ThawError, match="^text data .*gone.csv does not exist; pass a CSV or TSV file$"):
        read_table(tmp_path / "gone.csv")


def test_rows_swallowed_by_an_unclosed_quote_are_said_with_the_line_it_opens_on(tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    rows = ["label,text", 'ham,"oops', "spam,win cash", 'ham,see you"', "spam,free prize", "ham,ok", "spam,call now", "ham,later"]
    table.write_text("\n".join(rows) + "\n")
    data = load_text_data(table, val_split=0.5)
    assert len(data.everything()) == 5  # what csv reads: the three lines from the quote on are one text
    (caution,) = data.notes
    assert f"{table}:2:" in caution and "runs over 2 more line(s), 2 of which read as rows" in caution


def test_a_text_that_spans_lines_without_looking_like_rows_is_not_a_caution(tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    table.write_text('label,text\nspam,"win a prize\ncall now, today"\nham,"Dear Ann,\nham, eggs and tea\nBob"\nspam,free\nham,ok\n')
    data = load_text_data(table, val_split=0.5)
    assert len(data.everything()) == 4 and not data.notes


def test_skipped_rows_name_the_line_they_start_on_after_a_text_that_spans_lines(tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    table.write_text('label,text\nspam,"win a prize\ncall now"\nbroken\nham,ok\n')
    _, skipped = read_table(table)
    assert skipped == [(f"{table}:4", "1 column(s), expected at least 2")]


def test_a_texts_copies_go_to_one_split_so_nothing_held_out_was_trained_on(tmp_path: Path) -> None:
    table = tmp_path / "t.tsv"
    unique = [f"{label}\t{label} message {index}" for index in range(10) for label in ("ham", "spam")]
    table.write_text("\n".join(unique + ["ham\tsee you later"] * 11 + ["ham\t see you later "]) + "\n")  # spaces at the ends aside
    for seed in range(5):
        data = load_text_data(table, val_split=0.3, test_split=0.3, seed=seed)
        sides = [{text.strip() for text, _ in split} for split in (data.train, data.val, data.test)]
        assert not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])
        assert len(data.everything()) == 32
        assert data.layout.endswith("; 11 rows repeat a text of their label, kept in one split with it") and not data.notes
    table.write_text("\n".join(unique + ["ham\tsee you later"] * 2) + "\n")
    assert load_text_data(table, val_split=0.3).layout.endswith("; 1 row repeats a text of its label, kept in one split with it")


def test_copies_held_out_keep_to_the_share_of_rows_and_of_texts(tmp_path: Path) -> None:
    """A label of one text in 500 rows and 9 others: its 500 rows are no 10% val share, nor are its 9 others (90% of
    its texts): one of its 10 texts is held out."""
    table = tmp_path / "t.tsv"
    rows = ["ham\tok"] * 500 + [f"ham\tham {index}" for index in range(9)] + [f"spam\tspam {index}" for index in range(50)]
    table.write_text("\n".join(rows) + "\n")
    for seed in range(10):
        data = load_text_data(table, val_split=0.1, seed=seed)
        ham = [text for text, label in data.val if data.classes[label] == "ham"]
        assert len(ham) == 1 and ham[0] != "ok" and len(data.val) == 1 + 5 and not data.notes


def test_a_text_copied_many_times_leaves_other_texts_of_its_label_for_val_after_the_test_share(tmp_path: Path) -> None:
    """The test share takes 2 of ham's 10 texts, not all 9 that fit in its rows: val still gets one of the others."""
    table = tmp_path / "t.tsv"
    rows = ["ham\tok"] * 500 + [f"ham\tham {index}" for index in range(9)] + [f"spam\tspam {index}" for index in range(50)]
    table.write_text("\n".join(rows) + "\n")
    for seed in range(10):
        data = load_text_data(table, val_split=0.1, test_split=0.2, seed=seed)
        ham_test = [text for text, label in data.test if data.classes[label] == "ham"]
        ham_val = [text for text, label in data.val if data.classes[label] == "ham"]
        assert len(ham_test) == 2 and len(ham_val) == 1 and "ok" not in ham_test + ham_val and not data.notes


def test_the_earlier_rule_rebuilds_the_split_runs_made_with_it_trained_on(tmp_path: Path) -> None:
    """Runs split with copies held out within the share of rows alone (before the share of texts) are rebuilt so: there
    the test share took all 9 other texts of ham, which fit in its rows, and left val none of ham."""
    table = tmp_path / "t.tsv"
    rows = ["ham\tok"] * 500 + [f"ham\tham {index}" for index in range(9)] + [f"spam\tspam {index}" for index in range(50)]
    table.write_text("\n".join(rows) + "\n")
    for seed in range(3):
        data = load_text_data(table, val_split=0.1, test_split=0.2, seed=seed, split_rule="copies-within-rows")
        assert sorted(text for text, label in data.test if data.classes[label] == "ham") == [f"ham {index}" for index in range(9)]
        assert not [text for text, label in data.val if data.classes[label] == "ham"]
        assert data.notes == ("val has no row of label(s) ham: they have too few different texts to hold one out for each "
                              "split, so val scores say nothing of them; add more texts of them or lower --test-split",)
        assert data.layout.endswith("kept in one split with it")
    with pytest.raises(ThawError, match="unknown split rule 'copies'; use one of copies-within-rows-and-texts, copies-within-rows, copies-within-texts, row-by-row"):
        load_text_data(table, split_rule="copies")


# What each version of thaw split this table into (val_split 0.2, test_split 0.2, seed 0; found by running those
# versions): runs they made are resumed and scored on these splits, so each rule must rebuild them exactly. The digest
# is the train and val samples' as the runs recorded it, by which a run that said copies_together is told apart.
PINNED_TABLE = ["ham\tok"] * 12 + [f"ham\tham {index}" for index in range(8)] + ["ham\tham 0", "ham\tham 1"] + [
    f"spam\tspam {index}" for index in range(10)] + ["spam\tspam 0"] * 3
PINNED_SPLITS = {  # rule: (the last version that split by it, val texts, test texts, samples digest)
    "row-by-row": ("9716ca0", ["ham 0", "ok", "ok", "ok", "spam 1", "spam 5"], ["ham 4", "ok", "ok", "ok", "spam 0", "spam 6", "spam 9"], "3849f11076a257448c5d"),
    "copies-within-texts": ("fb08371", ["ham 4", "spam 0", "spam 0", "spam 0", "spam 0", "spam 1"], ["ham 5", "ham 7", "spam 6", "spam 9"], "7420685a3fb4edf59697"),
    "copies-within-rows": ("a0189b9", ["ham 2", "ham 3", "ham 4", "ham 6", "spam 1", "spam 4"], ["ham 1", "ham 1", "ham 5", "ham 7", "spam 6", "spam 8", "spam 9"], "ae998e223d8824790aba"),
    SPLIT_RULE: ("0900b69", ["ham 4", "spam 1", "spam 4"], ["ham 5", "ham 7", "spam 6", "spam 9"], "c9ebfd85bd2ad5b35097"),
}


def pinned_table(folder: Path) -> Path:
    table = folder / "pinned.tsv"
    table.write_text("\n".join(PINNED_TABLE) + "\n")
    return table


@pytest.mark.parametrize("rule", SPLIT_RULES)
def test_each_split_rule_rebuilds_the_split_the_thaw_that_used_it_made(tmp_path: Path, rule: str) -> None:
    _, val, test, digest = PINNED_SPLITS[rule]
    data = load_text_data(pinned_table(tmp_path), val_split=0.2, test_split=0.2, seed=0, split_rule=rule)
    assert (sorted(text for text, _ in data.val), sorted(text for text, _ in data.test)) == (val, test)
    assert samples_digest(data) == digest


def test_the_rules_a_run_records_are_read_and_one_this_thaw_does_not_know_is_one_line() -> None:
    assert recorded_split_rules({}, "thaw.json") == recorded_split_rules(None, "thaw.json") == ("row-by-row",)  # before copies
    assert recorded_split_rules({"copies_together": False}, "thaw.json") == ("row-by-row",)
    assert recorded_split_rules({"copies_together": True}, "thaw.json") == (SPLIT_RULE, "copies-within-rows", "copies-within-texts")
    assert recorded_split_rules({"split_rule": "copies-within-rows", "copies_together": True}, "thaw.json") == ("copies-within-rows",)
    for value in ("by-hand", None, ["row-by-row"]):
        with pytest.raises(ThawError, match=f"^the checkpoint in run records split_rule {re.escape(repr(value))}, which this thaw does "
                           "not know .*: it was written by a newer thaw, or damaged; use the thaw that made the run$"):
            recorded_split_rules({"split_rule": value}, "the checkpoint in run")


@pytest.mark.parametrize("rule", ["copies-within-rows", "copies-within-texts", SPLIT_RULE])
def test_a_run_that_said_copies_together_is_scored_on_the_split_its_samples_recorded(tmp_path: Path, rule: str) -> None:
    """Three versions of thaw recorded copies_together: true, each splitting its own way; the train and val samples
    the run recorded tell which, and evaluate rebuilds that split. Samples that match no rule (the table changed):
    today's rule, which evaluate's own check then refuses as changed data."""
    from thaw.export.inference import _run_data, evaluation_set

    table = pinned_table(tmp_path)
    _, val, test, digest = PINNED_SPLITS[rule]
    meta = {"task": "text", "val_split": 0.2, "test_split": 0.2, "train_config": {"seed": 0}, "copies_together": True,
            "data": {"samples": digest, "path": str(table)}}
    data = _run_data(meta, table)
    assert (sorted(text for text, _ in data.val), sorted(text for text, _ in data.test)) == (val, test)
    changed = meta | {"data": {"samples": "0" * 20, "path": str(table)}}
    assert sorted(text for text, _ in _run_data(changed, table).val) == PINNED_SPLITS[SPLIT_RULE][1]
    for split in ("val", "test"):  # a text run's test share is rebuilt by its seed too: not from changed data
        with pytest.raises(ThawError, match=f"differs from the data this run trained on .* the run's {split} split cannot be rebuilt .*"
                           r"pass held-out data as DATA, scored whole \(no --split\)$"):
            evaluation_set(changed, table, split)
    with pytest.raises(ThawError, match="^this dataset has no 'test' split"):  # a run without a test share: said so
        evaluation_set(changed | {"test_split": 0.0}, table, "test")
    with pytest.raises(ThawError, match="records copies_together, .* but no digest of its samples to tell which: its split cannot be rebuilt"):
        _run_data(meta | {"data": {"samples": None, "path": str(table)}}, table)  # a hand-edited record: not guessed


def test_a_label_no_split_can_hold_out_is_said(tmp_path: Path) -> None:
    """A label of one text copied stays in train; one of two texts gives its other to test, none to val: said."""
    table = tmp_path / "t.tsv"
    unique = [f"{label}\t{label} message {index}" for index in range(10) for label in ("ham", "spam")]
    table.write_text("\n".join(unique + ["promo\tbuy now"] * 6) + "\n")
    data = load_text_data(table, val_split=0.2, test_split=0.2)
    assert [note.split(":")[0] for note in data.notes] == ["val has no row of label(s) promo", "test has no row of label(s) promo"]
    assert all("too few different texts to hold one out for each split" in note for note in data.notes)
    assert all(note.endswith("add more texts of them or lower --test-split") for note in data.notes)
    table.write_text("\n".join(unique + ["promo\tbuy now", "promo\tbuy today"]) + "\n")
    data = load_text_data(table, val_split=0.2, test_split=0.2)
    assert [note.split(":")[0] for note in data.notes] == ["val has no row of label(s) promo"]
    assert not load_text_data(table, val_split=0.2).notes  # without a test share one of its texts goes to val


def test_where_no_text_fits_a_labels_share_its_smallest_is_held_out(tmp_path: Path) -> None:
    table = tmp_path / "t.tsv"
    rows = ["ham\ta"] * 3 + ["ham\tb"] * 4 + ["ham\tc"] * 5 + [f"spam\tspam {index}" for index in range(10)]
    table.write_text("\n".join(rows) + "\n")  # ham's 20% of 12 rows is 2: no text fits
    for seed in range(5):
        data = load_text_data(table, val_split=0.2, seed=seed)
        assert [text for text, _ in data.val if text in ("a", "b", "c")] == ["a"] * 3


def test_a_table_whose_labels_are_each_one_text_is_refused_in_one_line(tmp_path: Path) -> None:
    table = tmp_path / "t.tsv"
    table.write_text("ham\thi\n" * 5 + "spam\twin\n" * 5)
    with pytest.raises(ThawError, match="no row is left for val: every label's rows are copies of one text; a label needs 2 different texts at the least, one to train on and one to validate"):
        load_text_data(table)
    table.write_text("ham\thi\n" * 5 + "ham\tho\n" + "spam\twin\n" * 5 + "spam\twon\n")
    with pytest.raises(ThawError, match="copies of one text once the test share is held out; a label needs 3 different texts at the least, one each to train on, validate and test; or lower --test-split"):
        load_text_data(table, test_split=0.2)


def test_without_copies_the_split_is_the_same_as_row_by_row(tmp_path: Path) -> None:
    """Runs made before copies were kept together are rebuilt row by row: on a table without copies, both are one split."""
    table = tmp_path / "t.tsv"
    rng = random.Random(0)
    table.write_text("".join(f"{rng.choice(['a', 'b', 'c'])}\ttext {index}\n" for index in range(200)))
    for seed in range(3):
        together = load_text_data(table, val_split=0.2, test_split=0.1, seed=seed)
        apart = load_text_data(table, val_split=0.2, test_split=0.1, seed=seed, split_rule="row-by-row")
        assert (together.train, together.val, together.test) == (apart.train, apart.val, apart.test)


def test_a_text_under_two_labels_on_both_sides_is_still_counted(tmp_path: Path) -> None:
    """Copies are kept together within a label: the same text labelled ham and spam (a labelling slip) may be split."""
    table = tmp_path / "t.tsv"
    unique = [f"{label}\t{label} message {index}" for index in range(10) for label in ("ham", "spam")]
    table.write_text("\n".join(unique + ["ham\tsee you later"] * 2 + ["spam\tsee you later"] * 2) + "\n")
    crossed = 0
    for seed in range(10):
        data = load_text_data(table, val_split=0.3, seed=seed)
        val_repeats = sum(text == "see you later" for text, _ in data.val)
        in_train = any(text == "see you later" for text, _ in data.train)
        crossed += bool(val_repeats and in_train)
        assert bool(val_repeats and in_train) == any(note.startswith(f"{val_repeats} of the {len(data.val)} val texts") for note in data.notes)
    assert crossed


def test_held_out_texts_that_also_sit_in_train_are_counted(tmp_path: Path) -> None:
    """Where copies are split row by row (an older run's split, rebuilt to score it), the repeats are counted."""
    table = tmp_path / "t.tsv"
    unique = [f"{label}\t{label} message {index}" for index in range(10) for label in ("ham", "spam")]
    table.write_text("\n".join(unique) + "\n")
    assert not load_text_data(table, val_split=0.3, test_split=0.3, split_rule="row-by-row").notes
    table.write_text("\n".join(unique + ["ham\tsee you later"] * 12) + "\n")  # one text, twelve rows: some in each split
    data = load_text_data(table, val_split=0.3, test_split=0.3, split_rule="row-by-row")
    val_repeats = sum(text == "see you later" for text, _ in data.val)
    test_repeats = sum(text == "see you later" for text, _ in data.test)
    assert val_repeats and test_repeats
    assert data.notes == (
        f"{val_repeats} of the {len(data.val)} val texts also appear in train (repeated rows in the table), so val scores are "
        "partly scores on training data; if they are copies, remove them for a fair score",
        f"{test_repeats} of the {len(data.test)} test texts also appear in train (repeated rows in the table), so test scores are "
        "partly scores on training data; if they are copies, remove them for a fair score",
    )


def test_a_text_repeated_in_under_one_percent_of_a_split_is_not_a_caution(tmp_path: Path) -> None:
    table = tmp_path / "t.tsv"
    unique = [f"{label}\t{label} message {index}" for index in range(400) for label in ("ham", "spam")]
    table.write_text("\n".join(unique + ["ham\tok"] * 3) + "\n")  # "ok" thrice in 803 rows: at most 1 of 241 val texts
    data = load_text_data(table, val_split=0.3, split_rule="row-by-row")
    assert sum(text == "ok" for text, _ in data.val) <= 1 and not data.notes


def test_a_quote_left_open_to_the_end_of_the_file_is_said(tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    rows = ["spam,win", "ham,ok", "spam,free", 'ham,"see you', "spam,call now", "", "ham,later", "spam,prize", "ham,fine"]
    table.write_text("\n".join(rows) + "\n")
    (caution,) = load_text_data(table, val_split=0.5).notes
    assert f"{table}:4:" in caution and "runs over 5 more line(s), 4 of which" in caution


def test_a_header_of_unknown_names_read_as_a_row_is_named_in_the_error(tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    table.write_text("msg,tag\nwin cash,spam\nsee you,ham\nfree prize,spam\nlunch?,ham\n")
    with pytest.raises(ThawError, match=r"label\(s\) tag occur once; .* if line 1 \(msg, tag\) is a header, name its columns with --text-column"):
        load_text_data(table)
    assert load_text_data(table, columns=TextColumns(text="msg", label="tag")).classes == ("ham", "spam")
    table.write_text("win cash,spam\nsee you,ham\nfree prize,spam\nlunch?,ham\nhello,other\n")  # no header: a rare label
    with pytest.raises(ThawError, match=r"label\(s\) other occur once; each class needs 2 rows to be split into train and val$"):
        load_text_data(table)


def test_a_quote_left_open_in_a_text_first_table_is_said_in_the_skipped_row_and_the_caution(tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    good = [f"message {index},{('ham', 'spam')[index % 2]}" for index in range(10)]
    table.write_text("text,label\n" + "\n".join(good + ['"Hello,ham'] + good) + "\n")
    data = load_text_data(table, val_split=0.5)
    assert len(data.everything()) == 10  # the ten rows after the quote are one cell of a one-column row, skipped
    assert data.skipped == ((f"{table}:12", "1 column(s), expected at least 2; a quote opened on this line runs over 10 more line(s)"),)
    (caution,) = data.notes
    assert caution.startswith(f"{table}:12: a quote opened in this row runs over 10 more line(s), 10 of which read as rows")


def test_a_quote_left_open_in_the_first_row_names_its_line_in_the_shape_error(tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    table.write_text('text,label\n"Hello,ham\nwin,spam\nok,ham\n')
    with pytest.raises(ThawError, match="past its last column .*; line 2 opens a quote that runs over 2 more line"):
        load_text_data(table)


def test_the_classes_error_names_the_quote_that_swallowed_the_rows(tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    table.write_text('label,text\nham,"oops\nspam,win cash\nspam,free prize\nham,see you"\nham,ok\n')
    with pytest.raises(ThawError, match="1 label value.*; line 2 opens a quote that runs over 3 more line"):
        load_text_data(table)


@pytest.mark.parametrize("text", ['"Great film.\nI give it 10/10, 1"', '"one\u2028two,1"', '"a\u2028b,1\u2028c,0"'])
def test_a_text_with_one_line_that_reads_as_a_row_or_a_unicode_line_separator_is_no_caution(tmp_path: Path, text: str) -> None:
    table = tmp_path / "t.csv"
    rows = [f"review {index},{index % 2}" for index in range(8)]
    table.write_text("text,label\n" + "\n".join(rows + [f"{text},1"]) + "\n", encoding="utf-8")
    assert not load_text_data(table, val_split=0.5).notes


def test_the_header_hint_names_the_line_the_header_is_on(tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    table.write_text("\n\nmsg,tag\nwin cash,spam\nsee you,ham\nfree prize,spam\nlunch?,ham\n")
    with pytest.raises(ThawError, match=r"if line 3 \(msg, tag\) is a header"):
        load_text_data(table)


def test_a_label_column_past_the_common_width_does_not_break_the_quote_check(tmp_path: Path) -> None:
    table = tmp_path / "t.csv"  # most rows have 2 columns; the label is the third, in the rows that have one
    table.write_text("x,y\n" * 6 + 'a,b,ham\nc,d,spam\ne,f,ham\ng,h,spam\n"m\np,q\nz",r\n')
    pairs, skipped = read_table(table, TextColumns(text=0, label=2))
    assert len(pairs) == 4 and len(skipped) == 7


def test_a_closed_two_line_quote_is_not_named_as_left_open(tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    table.write_text('text,label\n"Dear sir,\nthanks",0\nhi,0\nyo,1\nbye,1\nrare,2\n')
    with pytest.raises(ThawError, match=r"label\(s\) 2 occur once; each class needs 2 rows to be split into train and val$"):
        load_text_data(table)


def test_a_headerless_table_whose_first_line_opens_a_quote_says_so(tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    table.write_text('"Hello,ham\nwin,spam\nok,ham\n')
    with pytest.raises(ThawError, match="it has one .*; line 1 opens a quote that runs over 2 more line"):
        read_table(table)


@pytest.mark.parametrize(("shares", "named"), [
    ({"test_split": 1.5}, r"test_split \(--test-split\) must be from 0 \(none held out\) and below 1, like 0.2, got 1.5"),
    ({"test_split": -0.1}, r"test_split \(--test-split\) must be from 0"),
    ({"val_split": 1.0}, r"val_split \(--val-split\) must be above 0 and below 1, like 0.2, got 1.0"),
    ({"val_split": 0.0, "test_split": 0.2}, r"val_split \(--val-split\) must be above 0"),
])
def test_a_share_out_of_range_names_the_argument_it_came_from(tmp_path: Path, shares: dict, named: str) -> None:
    """The Python API is not checked by the CLI's option types: a test share out of range was said as --val-split."""
    table = tmp_path / "t.tsv"
    table.write_text("".join(f"{label}\t{label} text {index}\n" for index in range(10) for label in ("ham", "spam")))
    with pytest.raises(ThawError, match=named):
        load_text_data(table, **shares)


def test_labels_that_are_one_number_written_two_ways_are_said_as_the_table_is_read(tmp_path: Path) -> None:
    """`1` and `1.0` in one label column (a spreadsheet rewrote some rows) train as two classes: the run says so."""
    table = tmp_path / "t.csv"
    rows = [f"text {index},{label}" for index, label in enumerate(["1", "1.0", "0"] * 6)]
    table.write_text("\n".join(rows) + "\n")
    data = load_text_data(table)
    assert data.classes == ("0", "1", "1.0")
    assert data.notes == ("classes 1 and 1.0 are the same number written 2 ways, so they are 2 classes; give them one name if they are one",)


def test_a_share_that_whole_rows_per_label_cannot_hold_says_the_real_one(tmp_path: Path) -> None:
    """`--val-split 1e-9` on a table said '1e-07% val held out' beside the rows really held out: one a label at least."""
    from tests.conftest import write_text_table

    table = write_text_table(tmp_path / "texts.tsv", rows_per_class=10)
    data = load_text_data(table, val_split=1e-9)
    real = f"{100 * len(data.val) / (len(data.train) + len(data.val)):.3g}%"
    assert len(data.val) == 2 and data.layout == f"text table, {real} val held out (1e-07% asked, in whole texts per label) (seed 0)"
    data = load_text_data(table, val_split=0.2, test_split=1e-9)
    test = f"{100 * len(data.test) / (len(data.train) + len(data.val) + len(data.test)):.3g}%"
    assert data.layout == f"text table, {test} test (1e-07% asked, in whole texts per label) then 20% val held out (seed 0)"
    rows = load_text_data(table, val_split=1e-9, split_rule="row-by-row")
    assert "(1e-07% asked, in whole rows per label)" in rows.layout
    assert load_text_data(table, val_split=0.2, test_split=0.2).layout == "text table, 20% test then 20% val held out (seed 0)"
