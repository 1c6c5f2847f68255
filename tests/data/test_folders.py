"""Dataset layouts and the errors that must come before any work."""

from __future__ import annotations

import csv
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import shared_data, write_class_images
from thaw import ThawError
from thaw.data.folders import as_percent, discover, stratified_split, would_be_read


def _refusal(data: Path) -> str:
    """The one line discover refuses `data` with."""
    with pytest.raises(ThawError) as refused:
        discover(data)
    return str(refused.value)


def test_split_folders_with_any_val_name(tmp_path: Path) -> None:
    write_class_images(tmp_path / "train", per_class=4)
    write_class_images(tmp_path / "valid", per_class=2)
    write_class_images(tmp_path / "test", per_class=3)
    data = discover(tmp_path)
    assert data.classes == ("blue", "green", "red")
    assert (len(data.train), len(data.val), len(data.test)) == (12, 6, 9)
    assert data.layout == "split folders (train/, valid/, test/)"  # the run's first line shows which folders it read


def test_a_folder_of_class_folders_beside_train_that_is_no_split_is_named_as_not_read(tmp_path: Path) -> None:
    """dev/ or holdout/ beside train/ may be the user's val or test split; thaw reads neither, and says so. Other
    folders (runs kept beside the data, docs) are no split and not mentioned."""
    write_class_images(tmp_path / "train", per_class=4)
    assert discover(tmp_path).notes == ()
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "README.txt").write_text("not a split")  # files only: no split of class folders
    (tmp_path / ".cache" / "red").mkdir(parents=True)  # hidden: never data
    (tmp_path / "runs" / "first" / "feature-cache").mkdir(parents=True)  # a run folder kept beside the data
    assert discover(tmp_path).notes == ()
    write_class_images(tmp_path / "dev", per_class=2)
    data = discover(tmp_path)
    assert len(data.val) == 3 and {path.parts[-3] for path, _ in data.train + data.val} == {"train"}  # dev/ is not read
    assert data.notes == (
        "dev/ beside train/ is not read: thaw reads train/, val/ (or valid/, validation/) and test/; "
        "rename a folder to val/ or test/ if it is one of those",
    )
    write_class_images(tmp_path / "holdout", classes=("RED", "Green"), per_class=2)  # the classes in another case
    assert discover(tmp_path).notes[0].startswith("dev/, holdout/ beside train/ are not read: ")


def test_mlruns_beside_train_with_classes_named_as_its_experiments_is_no_split(tmp_path: Path) -> None:
    """MLflow's file store keeps experiments 0/, 1/ (a meta.yaml, then run folders) beside train/ when run from the
    data folder: classes 0 and 1 (a binary set, digits) must not make it look like a split; nor a folder that holds
    one class folder beside folders of other names."""
    write_class_images(tmp_path / "train", classes=("0", "1"), per_class=4)
    for experiment in ("0", "1"):
        (tmp_path / "mlruns" / experiment / "5f3a" / "artifacts").mkdir(parents=True)
        (tmp_path / "mlruns" / experiment / "meta.yaml").write_text("name: Default")
    write_class_images(tmp_path / "notebooks", classes=("0", "drafts"), per_class=1)
    assert discover(tmp_path).notes == ()


def test_train_and_test_without_val_hold_out_a_seeded_stratified_val_from_train(tmp_path: Path) -> None:
    """Oxford Pets and many Kaggle sets come as train/ and test/: val comes from train/, test/ stays test."""
    write_class_images(tmp_path / "train", per_class=10)
    write_class_images(tmp_path / "test", per_class=3, seed=1)
    first, again, other = discover(tmp_path, seed=3), discover(tmp_path, seed=3), discover(tmp_path, seed=4)
    assert (len(first.train), len(first.val), len(first.test)) == (24, 6, 9)
    assert first.val == again.val and first.val != other.val
    assert Counter(label for _, label in first.val) == {0: 2, 1: 2, 2: 2}
    train_files = set((tmp_path / "train").rglob("*.png"))
    assert {path for path, _ in first.train + first.val} == train_files and not set(first.train) & set(first.val)
    assert {path.parent.parent.name for path, _ in first.test} == {"test"}
    assert first.layout == "split folders (train/test), 20% of train held out as val (seed 3)"
    assert discover(tmp_path, val_split=0.3).layout.startswith("split folders (train/test), 30% of train held out")


def test_train_alone_holds_out_val_as_a_folder_of_class_folders_would(tmp_path: Path) -> None:
    write_class_images(tmp_path / "train", per_class=10)
    data, same_images = discover(tmp_path), discover(tmp_path / "train")
    assert data.test is None and "train only" in data.layout
    assert data.val == same_images.val and data.train == same_images.train


def test_real_hymenoptera_layout() -> None:
    data = discover(shared_data("hymenoptera_data"))
    assert data.classes == ("ants", "bees") and (len(data.train), len(data.val)) == (245, 153)


def test_the_seeded_split_is_the_one_earlier_runs_were_made_with() -> None:
    """A resumed or scored run rebuilds its val (and test) split from its seed: a change to the split would move
    samples between train and val under every earlier run. Pinned to the split thaw has always made."""
    samples = [(f"item {index}", index % 3) for index in range(30)]
    train, held = stratified_split(samples, 0.2, 0)
    assert [name for name, _ in held] == ["item 3", "item 6", "item 7", "item 19", "item 29", "item 11"]
    assert stratified_split(samples, 0.2, 0, same=lambda sample: sample[0]) == (train, held)  # no copies: the same split
    assert sorted(train + held) == sorted(samples)


def test_class_folders_split_stratified_and_seeded(tmp_path: Path) -> None:
    write_class_images(tmp_path, per_class=10)
    first, again, other = discover(tmp_path, seed=3), discover(tmp_path, seed=3), discover(tmp_path, seed=4)
    assert first.val == again.val and first.val != other.val
    assert Counter(label for _, label in first.val) == {0: 2, 1: 2, 2: 2}
    assert not set(first.train) & set(first.val)


def test_csv_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_class_images(tmp_path / "images", per_class=5)
    rows = ["path,label"] + [f"images/{p.parent.name}/{p.name},{p.parent.name}" for p in sorted((tmp_path / "images").rglob("*.png"))]
    (tmp_path / "labels.csv").write_text("\n".join(rows))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # relative paths are the manifest's, whatever the working folder
    data = discover(tmp_path / "labels.csv")
    assert data.classes == ("blue", "green", "red") and len(data.train) + len(data.val) == 15
    assert all(path.is_relative_to(tmp_path / "images") for path, _ in data.train)
    assert data.layout == "CSV manifest, 20% held out"


@pytest.mark.parametrize("suffix", [".tsv", ".TAB"])
def test_a_tab_separated_manifest_is_read_by_its_suffix_commas_in_names_and_all(tmp_path: Path, suffix: str) -> None:
    """pandas' to_csv(sep="\\t") and spreadsheets write .tsv: read with tabs, a comma in a file name is part of it."""
    write_class_images(tmp_path / "images", per_class=4)
    for image in sorted((tmp_path / "images").rglob("*.png"))[::2]:
        image.rename(image.with_name(f"shot, {image.name}"))  # a comma that a .csv manifest would have to quote
    images = sorted((tmp_path / "images").rglob("*.png"))
    rows = ["path\tlabel"] + [f"images/{p.parent.name}/{p.name}\t{p.parent.name}" for p in images]
    (tmp_path / f"labels{suffix}").write_text("\n".join(rows))
    data = discover(tmp_path / f"labels{suffix}")
    assert data.classes == ("blue", "green", "red")
    assert sorted(path for path, _ in data.train + data.val) == images
    assert all(data.classes[label] == path.parent.name for path, label in data.train + data.val)
    assert data.layout.startswith("TSV manifest")


def test_asking_a_manifest_for_its_test_split_says_how_to_score_held_out_images(tmp_path: Path) -> None:
    """A manifest's images are split into train and val only: a test/ folder beside train/ is no advice for it."""
    write_class_images(tmp_path / "images", per_class=3)
    rows = [f"images/{p.parent.name}/{p.name},{p.parent.name}" for p in sorted((tmp_path / "images").rglob("*.png"))]
    (tmp_path / "labels.csv").write_text("\n".join(rows))
    with pytest.raises(ThawError) as refused:
        discover(tmp_path / "labels.csv").split("test")
    assert str(refused.value) == (
        "this dataset has no 'test' split; splits: train, val (list held-out images in a manifest of their own and "
        "score it whole: thaw evaluate RUN THAT_MANIFEST)"
    )
    with pytest.raises(ThawError, match=r"\(put test images in a test/ folder beside train/\)$"):
        discover(tmp_path / "images").split("test")


def test_a_tab_separated_manifest_with_a_third_column_says_its_columns_with_a_tab(tmp_path: Path) -> None:
    write_class_images(tmp_path / "images", per_class=2)
    file = f"images/blue/{sorted((tmp_path / 'images' / 'blue').iterdir())[0].name}"
    (tmp_path / "labels.tsv").write_text(f"path\tlabel\tsplit\n{file}\tblue\ttest\n")
    assert _refusal(tmp_path / "labels.tsv") == (
        f"{tmp_path / 'labels.tsv'}: line 2: 3 columns, expected path<TAB>label (remove the others, or quote a path or "
        "label that holds a tab)"
    )


@pytest.mark.parametrize(
    "suffix, separator, said",
    [
        (".tsv", ",", "its lines are separated by commas, and a .tsv manifest's by tabs; name it .csv"),
        (".csv", "\t", "its lines are separated by tabs, and a .csv manifest's by commas; name it .tsv"),
        (".csv", ";", "its lines are separated by semicolons, and a .csv manifest's by commas; save it with commas as .csv"),
    ],
)
def test_a_manifest_written_with_another_separator_is_one_line_naming_it(
    tmp_path: Path, suffix: str, separator: str, said: str,
) -> None:
    """Each line would read as one column: one line for the file, not an 'expected path,label' for each of its lines."""
    write_class_images(tmp_path / "images", per_class=3)
    rows = [f"path{separator}label"] + [f"images/{p.parent.name}/{p.name}{separator}{p.parent.name}" for p in (tmp_path / "images").rglob("*.png")]
    (tmp_path / f"labels{suffix}").write_text("\n".join(rows))
    assert _refusal(tmp_path / f"labels{suffix}") == f"{tmp_path / f'labels{suffix}'}: {said}"


def test_a_one_column_csv_is_not_said_to_be_separated_by_what_its_paths_hold(tmp_path: Path) -> None:
    (tmp_path / "labels.csv").write_text('"a,b.png"\n"c.png"\n')  # labels forgotten; the comma is the file name's own
    assert _refusal(tmp_path / "labels.csv") == f"{tmp_path / 'labels.csv'}: line 1: expected path,label; line 2: expected path,label"
    (tmp_path / "labels.csv").write_text("a;1.png\nc.png\nd.png\n")  # one path with a semicolon: no semicolon-separated file
    assert "semicolons" not in _refusal(tmp_path / "labels.csv")


def test_a_tab_separated_manifest_headed_label_path_is_told_to_swap_in_its_own_notation(tmp_path: Path) -> None:
    (tmp_path / "labels.tsv").write_text("label\tpath\nred\timages/red/0.png\n")
    assert _refusal(tmp_path / "labels.tsv") == f"{tmp_path / 'labels.tsv'}: the header is label<TAB>path; thaw reads path<TAB>label: swap the two columns"


@pytest.mark.parametrize("suffix, separator", [(".csv", ","), (".tsv", "\t")])
def test_a_manifest_line_of_blanks_reads_as_an_empty_line(tmp_path: Path, suffix: str, separator: str) -> None:
    """A spreadsheet's last row of spaces, or a stray tab, is no row naming an image with an empty label."""
    write_class_images(tmp_path / "images", per_class=3)
    rows = [f"images/{p.parent.name}/{p.name}{separator}{p.parent.name}" for p in sorted((tmp_path / "images").rglob("*.png"))]
    (tmp_path / f"labels{suffix}").write_text("\n".join([*rows[:4], "   ", *rows[4:], "\t", f" {separator} ", ""]))
    data = discover(tmp_path / f"labels{suffix}")
    assert len(data.train) + len(data.val) == 9 and data.classes == ("blue", "green", "red")


def test_a_manifest_whose_paths_are_written_from_the_working_folder_says_where_they_are_read_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    write_class_images(tmp_path / "images", per_class=3)
    (tmp_path / "lists").mkdir()
    rows = [f"images/{p.parent.name}/{p.name},{p.parent.name}" for p in sorted((tmp_path / "images").rglob("*.png"))]
    (tmp_path / "lists" / "labels.csv").write_text("\n".join(rows))
    monkeypatch.chdir(tmp_path)  # where images/... would be found
    assert _refusal(Path("lists/labels.csv")) == (
        f"lists/labels.csv: 9 listed files do not exist (first: lists/{rows[0].split(',')[0]}); a relative path is read "
        "from the manifest's folder (lists), not the working folder: write the paths from there"
    )
    monkeypatch.chdir(tmp_path / "images")  # from here the paths name nothing: no guess at why
    assert _refusal(tmp_path / "lists" / "labels.csv").endswith(f"9 listed files do not exist (first: {tmp_path / 'lists' / rows[0].split(',')[0]})")


@pytest.mark.parametrize("suffix, separator", [(".csv", ","), (".tsv", "\t")])
@pytest.mark.parametrize("folder", ["plain", "with\\backslash"])  # the manifest's own folder's name is no row's
def test_a_manifest_written_with_windows_separators_says_to_write_them_with_slashes(
    tmp_path: Path, suffix: str, separator: str, folder: str,
) -> None:
    """images\\red\\0.png is one file name on Linux and macOS: each such path is missing, and the line says why."""
    tmp_path = tmp_path / folder
    write_class_images(tmp_path / "images", per_class=3)
    rows = [f"images\\{p.parent.name}\\{p.name}{separator}{p.parent.name}" for p in sorted((tmp_path / "images").rglob("*.png"))]
    (tmp_path / f"labels{suffix}").write_text("\n".join([*rows[:8], rows[8].replace("\\", "/")]))  # the last written with /
    refusal = _refusal(tmp_path / f"labels{suffix}")
    assert refusal == (
        f"{tmp_path / f'labels{suffix}'}: 8 listed files do not exist (first: {tmp_path / rows[0].split(separator)[0]}); its paths are "
        "written with \\ (Windows): write them with / (images/a.png), which Windows reads too"
    )
    (tmp_path / f"labels{suffix}").write_text("\n".join(row.replace("\\", "/") for row in rows))
    assert len(discover(tmp_path / f"labels{suffix}").classes) == 3


@pytest.mark.parametrize("ending", ["\n", "\r\n", "\r"])
@pytest.mark.parametrize("opened", ['"b.png,red', '#todo,"check these'])  # a comment's quote takes the rows after it too
def test_a_quote_left_open_in_a_manifest_is_said_at_the_line_it_opens_on(tmp_path: Path, ending: str, opened: str) -> None:
    """The reader takes every line after an open quote as one field: the line to fix is the quote's, not the last."""
    lines = ["a.png,red", opened, "c.png,blue", "d.png,blue", ""]
    (tmp_path / "labels.csv").write_bytes(ending.join(lines).encode())
    assert _refusal(tmp_path / "labels.csv") == (
        f"{tmp_path / 'labels.csv'}: line 2: a quote (\") opened there is never closed, so every line from there to the end "
        "reads as one field; close it on its line, or remove it"
    )


@pytest.mark.parametrize(
    "lines, said",
    [
        (["a.png,red", '"b.png', 'x",red', "c.png,blue"], "line 2: a quote (\") opened there runs on to line 3, so those lines read as one field"),
        (["a.png,red", "c.png,blue", '"d.png,blue', ""], "line 3: a quote (\") opened there is never closed, so every line from there"),
    ],
)
def test_a_quote_that_spans_lines_or_opens_on_the_last_one_is_said_at_its_line(tmp_path: Path, lines: list[str], said: str) -> None:
    (tmp_path / "labels.csv").write_text("\n".join(lines))
    assert said in _refusal(tmp_path / "labels.csv")


def test_a_manifest_lists_a_file_whose_name_holds_a_line_break_quoted_as_csv_writes_it(tmp_path: Path) -> None:
    """A Linux file name may hold a line break; Python's csv module (and a spreadsheet) quote the field so it spans two
    lines. That row names the file, so it is read as the file, not refused as a quote left open."""
    write_class_images(tmp_path / "images", per_class=3, size=16)
    red = sorted((tmp_path / "images" / "red").iterdir())
    odd = red[0].with_name("one\nred.png")
    red[0].rename(odd)
    files = [odd, *red[1:], *sorted((tmp_path / "images").glob("[!r]*/*.png"))]
    with (tmp_path / "labels.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([(str(file.relative_to(tmp_path)), file.parent.name) for file in files])
    assert '"images/red/one\nred.png",red' in (tmp_path / "labels.csv").read_text()  # quoted over two lines
    data = discover(tmp_path / "labels.csv", val_split=1 / 3)
    assert odd in {path for path, _ in data.train + data.val} and len(data.train + data.val) == len(files)


def test_a_manifest_of_missing_files_read_from_a_removed_working_folder_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "labels.csv").write_text("images/a.png,red\nimages/b.png,blue\n")
    (tmp_path / "gone").mkdir()
    monkeypatch.chdir(tmp_path / "gone")
    (tmp_path / "gone").rmdir()  # the working folder of a shell whose folder was deleted
    assert _refusal(tmp_path / "lists" / "labels.csv") == f"{tmp_path / 'lists' / 'labels.csv'}: 2 listed files do not exist (first: {tmp_path / 'lists' / 'images' / 'a.png'})"


def test_csv_manifest_with_missing_files(tmp_path: Path) -> None:
    (tmp_path / "labels.csv").write_text("path,label\nnope.png,cat\n")
    with pytest.raises(ThawError, match="1 listed file does not exist") as error:
        discover(tmp_path / "labels.csv")
    assert "swapped" not in str(error.value)  # cat names no file: nothing says the columns are the other way round


@pytest.mark.parametrize(
    "lines, said",
    [
        (["path,label"], "labels.csv lists no images; expected lines of path,label"),
        (["# all commented out", "# images/a.png,cat"], "labels.csv lists no images"),
        (["path,label", "images,blue"], ": 1 listed path is a folder, not an image file (first: "),
        # a third column would be dropped without a word: a split column's test rows would train
        (["path,label,split", "FILE,blue,test"], ": line 2: 3 columns, expected path,label (remove the others, or quote a path"),
        (["FILE,blue", ",red"], ": line 2: empty path"),
        (["FILE,blue", f"{'a' * 300}.png,red"], ": 1 listed file does not exist (first: "),  # a name too long for the file system
        # the columns the other way round, with the header or without it
        (["label,path", "blue,FILE"], "labels.csv: the header is label,path; thaw reads path,label: swap the two columns"),
        (["blue,FILE"], ": 1 listed file does not exist (first: "),
        (["blue,FILE"], "; the columns look swapped: thaw reads path,label"),
    ],
)
def test_csv_manifest_that_would_be_misread_is_refused(tmp_path: Path, lines: list[str], said: str) -> None:
    write_class_images(tmp_path / "images", per_class=2)
    file = f"images/blue/{sorted((tmp_path / 'images' / 'blue').iterdir())[0].name}"
    (tmp_path / "labels.csv").write_text("\n".join(line.replace("FILE", file) for line in lines))
    assert said in _refusal(tmp_path / "labels.csv")


def test_csv_manifest_with_an_empty_trailing_column_is_read(tmp_path: Path) -> None:
    """`path,label,` (a spreadsheet's export with an empty column) loses nothing: it reads as path,label."""
    write_class_images(tmp_path / "images", per_class=3)
    rows = [f"images/{p.parent.name}/{p.name},{p.parent.name}," for p in sorted((tmp_path / "images").rglob("*.png"))]
    (tmp_path / "labels.csv").write_text("\n".join(rows))
    assert len(discover(tmp_path / "labels.csv").train) + len(discover(tmp_path / "labels.csv").val) == 9


@pytest.mark.parametrize("header", [True, False])
def test_csv_manifest_with_an_empty_label_or_a_file_listed_twice(tmp_path: Path, header: bool) -> None:
    """An empty label would become a class named ''; a file listed twice would be two samples, one of which the split
    may hold out as val: each is refused, by the line a user's editor shows."""
    write_class_images(tmp_path / "images", per_class=3)
    files = [f"images/{p.parent.name}/{p.name}" for p in sorted((tmp_path / "images").rglob("*.png"))]
    rows = ["# made by hand", *(["path,label"] if header else []), f"{files[0]},blue", f"{files[1]},", f"{files[2]},red", f"{files[2]},green"]
    (tmp_path / "labels.csv").write_text("\n".join(rows))
    line = 4 if header else 3  # the empty label's line in the file
    with pytest.raises(ThawError, match=rf"line {line}: empty label; 1 file is listed more than once \(first: .*\(red, green\)\)"):
        discover(tmp_path / "labels.csv")
    (tmp_path / "labels.csv").write_text("\n".join([f"{files[0]},blue", f"{files[0]},blue", f"{files[1]},red"]))
    with pytest.raises(ThawError, match=r"1 file is listed more than once \(first: .*\(blue, blue\)\)"):
        discover(tmp_path / "labels.csv")


@pytest.mark.parametrize("other", ["./FILE", "images/../FILE", "ABSOLUTE", "LINK"])
def test_a_file_listed_twice_under_two_spellings_is_refused(tmp_path: Path, other: str) -> None:
    """images/a.png and ./images/a.png (or images/../images/a.png, or its absolute path) are one image: two labels for
    it would train it as both classes, and the split could hold one copy out as val."""
    write_class_images(tmp_path / "images", per_class=3)
    files = [f"images/{p.parent.name}/{p.name}" for p in sorted((tmp_path / "images").rglob("*.png"))]
    (tmp_path / "alias.png").symlink_to(tmp_path / files[0])  # a link to it is the same image under another name
    spelled = {"ABSOLUTE": str(tmp_path / files[0]), "LINK": "alias.png"}.get(other, other.replace("FILE", files[0]))
    (tmp_path / "labels.tsv").write_text("\n".join([f"{files[0]}\tblue", f"{spelled}\tgreen", *(f"{f}\tred" for f in files[1:])]))
    assert _refusal(tmp_path / "labels.tsv") == (
        f"{tmp_path / 'labels.tsv'}: 1 file is listed more than once (first: {tmp_path / files[0]} (blue, green)); "
        "list each file once, with one label"
    )


def test_unreadable_files_are_skipped_and_listed(tmp_path: Path) -> None:
    write_class_images(tmp_path, per_class=4)
    (tmp_path / "red" / "notes.jpg").write_text("not an image")
    (tmp_path / "red" / "empty.png").write_bytes(b"")
    data = discover(tmp_path)
    assert len(data.train) + len(data.val) == 12
    assert sorted(Path(p).name for p, _ in data.skipped) == ["empty.png", "notes.jpg"]


@pytest.mark.parametrize("names", [("Train", "Val", "Test"), ("TRAIN", "Valid", "test"), ("train", "val", "Test")])
def test_split_folder_names_in_any_case(tmp_path: Path, names: tuple[str, str, str]) -> None:
    """Train/ and Val/ (a Windows or Kaggle habit) are split folders, not two classes holding the real ones."""
    train, val, test = names
    write_class_images(tmp_path / train, per_class=4)
    write_class_images(tmp_path / val, per_class=2)
    write_class_images(tmp_path / test, per_class=3)
    data = discover(tmp_path)
    assert data.classes == ("blue", "green", "red") and data.val_from_folder
    assert {path.parent.parent.name for path, _ in data.test} == {test}
    assert {path.parent.parent.name for path, _ in data.val} == {val}
    assert (len(data.train), len(data.val), len(data.test)) == (12, 6, 9)
    assert data.layout == f"split folders ({train}/, {val}/, {test}/)"


def test_two_folders_for_the_val_split_are_refused_naming_both(tmp_path: Path) -> None:
    # Scoring on whichever folder thaw looked at first would be a silent guess between two sets of images.
    for split in ("train", "val", "valid"):
        write_class_images(tmp_path / split, per_class=3)
    with pytest.raises(ThawError, match=r"holds both val/ and valid/, two val splits; keep one") as refused:
        discover(tmp_path)
    assert "\n" not in str(refused.value)


def test_a_link_to_nowhere_is_skipped_and_listed_like_any_unreadable_file(tmp_path: Path) -> None:
    # Listed, it is counted in the warning and refused by --strict, as an empty file is.
    write_class_images(tmp_path, per_class=4)
    (tmp_path / "red" / "broken.jpg").symlink_to(tmp_path / "nowhere.jpg")
    data = discover(tmp_path)
    assert [(Path(path).name, reason) for path, reason in data.skipped] == [("broken.jpg", f"broken link to {tmp_path / 'nowhere.jpg'}")]
    assert len(data.train) + len(data.val) == 12


def test_a_named_pipe_or_a_socket_in_a_class_folder_is_skipped_and_listed_without_being_opened(tmp_path: Path) -> None:
    # Opening a named pipe waits for a writer forever; passed over, it was never said to be left out.
    import socket

    write_class_images(tmp_path, per_class=4)
    os.mkfifo(tmp_path / "red" / "pipe.jpg")
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind(str(tmp_path / "red" / "sock.png"))
        data = discover(tmp_path)
    assert sorted((Path(path).name, reason) for path, reason in data.skipped) == [
        ("pipe.jpg", "a named pipe, not a regular file"), ("sock.png", "a socket, not a regular file")]
    assert len(data.train) + len(data.val) == 12


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda root: (write_class_images(root, per_class=3), (root / "empty").mkdir()), "no readable images: empty"),
        (lambda root: write_class_images(root, classes=("only",)), "found 1 class \\(only\\); a classifier needs at least 2"),
        (lambda root: (write_class_images(root / "train"), write_class_images(root / "val", classes=("red", "green", "cyan"))), "only in val: \\['cyan'\\]"),
        (lambda root: (write_class_images(root / "train"), write_class_images(root / "val", classes=("red", "green"))), "missing from val: \\['blue'\\]\\); give val/ the same class folders as train/, or remove val/ to have a share of train/ held out$"),
        (lambda root: (write_class_images(root / "train"), write_class_images(root / "test", classes=("red", "green", "cyan"))), "test/ holds classes that train/ lacks \\(\\['cyan'\\]\\), which no model trained on train/ can predict; remove them from test/ or add them to train/ \\(a test split may hold some of train/'s classes\\)"),
        # café typed on Linux (one code point) and café unzipped on macOS (e plus an accent): it read "only in val:
        # ['café']; missing from val: ['café']"
        (lambda root: (write_class_images(root / "train", classes=("caf\u00e9", "tea")), write_class_images(root / "val", classes=("cafe\u0301", "tea"))),
         "remove val/ to have a share of train/ held out; 'cafe\\\\u0301' and train/'s 'caf\\\\xe9' are the same letters encoded otherwise"),
        (lambda root: root.mkdir(), "holds no class folders"),
        # one image a class: none left for val, whose accuracy (0 of 0) would choose the epoch delivered
        (lambda root: write_class_images(root, per_class=1), "no sample is left for val: every class has a single one; a class needs 2"),
        (lambda root: write_class_images(root / "train", per_class=1), "no sample is left for val"),
        # one level too high: animals/ would be the only class, of every image
        (lambda root: write_class_images(root / "animals", classes=("cat", "dog")), "holds one folder, animals/, whose folders \\(cat/, dog/\\) look like the classes; pass .*animals$"),
    ],
)
def test_meaningless_datasets_fail_before_any_work(tmp_path: Path, make, message: str) -> None:
    root = tmp_path / "data"
    make(root)
    with pytest.raises(ThawError, match=message):
        discover(root)


def test_an_empty_class_folder_is_named_once_under_the_data_path(tmp_path: Path) -> None:
    root = write_class_images(tmp_path / "data", per_class=3)
    (root / "empty").mkdir()
    with pytest.raises(ThawError, match=f"^{root}: class folders with no readable images: empty$"):  # not "data: data: ..."
        discover(root)



def test_a_class_folder_of_files_that_do_not_read_names_them(tmp_path: Path) -> None:
    """'class folders with no readable images: blue' said neither which files nor why (a .heic no decoder here reads)."""
    root = write_class_images(tmp_path / "data", per_class=3)
    (root / "photos").mkdir()
    for index in range(2):
        (root / "photos" / f"{index}.heic").write_bytes(b"no image a decoder here reads" * 4)
    with pytest.raises(ThawError, match=rf"^{re.escape(str(root))}: class folders with no readable images: photos \(2 file\(s\) there did not read, first {re.escape(str(root / 'photos' / '0.heic'))}: "):
        discover(root)
    split = tmp_path / "split"
    write_class_images(split / "train", per_class=3), write_class_images(split / "val", per_class=1)
    (split / "val" / "red" / "000.png").write_bytes(b"")
    with pytest.raises(ThawError, match=rf"val: class folders with no readable images: red \(1 file\(s\) there did not read, first {re.escape(str(split / 'val' / 'red' / '000.png'))}: "):
        discover(split)


def test_images_straight_in_train_without_class_folders_are_said_to_carry_no_labels(tmp_path: Path) -> None:
    write_class_images(tmp_path / "photos", per_class=3)
    train = tmp_path / "data" / "train"
    train.mkdir(parents=True)
    for image in (tmp_path / "photos" / "red").iterdir():
        image.rename(train / image.name)
    with pytest.raises(ThawError, match=f"^{train} holds 3 image\\(s\\) but no class folders, so no labels; .*{train}/CLASS/IMAGE$"):
        discover(tmp_path / "data")


def test_a_test_folder_of_some_of_the_classes_is_kept_not_refused(tmp_path: Path) -> None:
    """test/ trains nothing; one lacking a rare class refused the whole run, though evaluate scores such a set."""
    root = tmp_path / "data"
    write_class_images(root / "train", per_class=3)
    write_class_images(root / "val", per_class=2)
    write_class_images(root / "test", classes=("red", "green"), per_class=2)
    data = discover(root)
    assert data.classes == ("blue", "green", "red") and len(data.test) == 4
    assert {data.classes[label] for _, label in data.test} == {"red", "green"}


def test_a_class_folder_name_that_is_not_utf8_is_refused_in_one_line(tmp_path: Path) -> None:
    """An old zip's Latin-1 'abeill\\xe9' crashed the run's record (a traceback); its plots and report could not say it."""
    root = tmp_path / "data"
    write_class_images(root, per_class=3)
    os.rename(root / "red", os.fsencode(root) + b"/abeill\xe9")
    with pytest.raises(ThawError, match="class folder names that are not UTF-8: abeill\ufffd; rename them"):
        discover(root)


def test_a_kaggle_style_unlabelled_test_folder_is_sent_to_predict(tmp_path: Path) -> None:
    """Kaggle ships train/CLASS/ beside test/ of loose images to predict: 'put each class's images in a folder'
    asked the user to label what they want thaw to label."""
    root = tmp_path / "data"
    write_class_images(root / "train", per_class=3)
    write_class_images(tmp_path / "loose", per_class=2)
    (root / "test").mkdir()
    for image in (tmp_path / "loose" / "red").iterdir():
        image.rename(root / "test" / image.name)
    with pytest.raises(ThawError, match=f"^{root / 'test'} holds 2 image\\(s\\) but no class folders: .*or train on {root / 'train'} alone.*thaw predict RUN {root / 'test'}$"):
        discover(root)


def test_a_val_link_to_nowhere_is_refused_not_replaced_by_a_share_of_train(tmp_path: Path) -> None:
    """val/ linked to a disk that is not mounted: holding out a share of train/ instead would change the run unseen."""
    write_class_images(tmp_path / "data" / "train", per_class=4)
    (tmp_path / "data" / "val").symlink_to(tmp_path / "unmounted")
    with pytest.raises(ThawError, match=f"^{tmp_path / 'data' / 'val'} is a link to {tmp_path / 'unmounted'}, which does not exist; fix"):
        discover(tmp_path / "data")


def test_the_held_out_share_is_said_as_given_not_rounded_to_a_whole_percent(tmp_path: Path) -> None:
    root = write_class_images(tmp_path / "data", per_class=6)
    assert discover(root, val_split=0.125).layout == "class folders, 12.5% held out (seed 0)"  # 1 of 6 a class: near enough
    assert discover(root, val_split=0.45).layout == "class folders, 45% held out (seed 0)"
    assert as_percent(0.9996) == "99.96%" and as_percent(0.99999) == "99.999%" and as_percent(1.0) == "100%"
    assert as_percent(0.9999999999999) != "100%" and as_percent(1 - 2**-53) != "100%"  # the largest share below 1


def test_missing_path() -> None:
    with pytest.raises(ThawError, match="does not exist"):
        discover("/no/such/folder")


def test_a_class_named_train_in_a_folder_of_class_folders_stays_a_class(tmp_path: Path) -> None:
    # Split names in another case count only where every folder is one: Bus/, Car/ and Train/ are a vehicle set's classes.
    write_class_images(tmp_path, classes=("Bus", "Car", "Train"), per_class=5)
    data = discover(tmp_path)
    assert data.classes == ("Bus", "Car", "Train") and not data.split_folders
    # written in lower case, train/ is the split (Kaggle's train/ of unlabelled images beside test1/ must stay refused):
    # beside two or more folders of images the refusal says how to keep it a class
    lower = write_class_images(tmp_path / "lower", classes=("bus", "car", "train"), per_class=5)
    assert _refusal(lower) == (
        f"{lower / 'train'} holds 5 image(s) but no class folders, so no labels; put each class's images in a folder named "
        f"after it: {lower / 'train'}/CLASS/IMAGE; if train/ is a class beside bus/, car/, name it Train/: thaw reads a "
        "split's name in another case as a class where other folders are no split's"
    )
    # the hint is for a class named train: a val/ of loose images beside such folders gets none
    loose_val = tmp_path / "loose-val"
    write_class_images(loose_val / "train", classes=("cat", "dog"), per_class=3)
    write_class_images(loose_val, classes=("val", "extra1", "extra2"), per_class=2)
    with pytest.raises(ThawError, match=r"val holds 2 image\(s\) but no class folders, so no labels; put each class's images in a folder named after it: .*val/CLASS/IMAGE$"):
        discover(loose_val)
    kaggle = write_class_images(tmp_path / "kaggle", classes=("train", "test1"), per_class=3)  # dogs-vs-cats as it comes
    with pytest.raises(ThawError, match=r"train holds 3 image\(s\) but no class folders, so no labels; put each class's images in a folder named after it: .*train/CLASS/IMAGE$"):
        discover(kaggle)


def test_class_folders_beside_train_split_are_warned_of_as_not_read(tmp_path: Path) -> None:
    """cat/ and dog/ of images beside train/cat/ and train/dog/: the split layout reads train/ alone, which a user
    who added the new photos beside it would not know. STL-10's unlabeled/ or a figures/ folder is no class's: no word."""
    write_class_images(tmp_path / "train", classes=("cat", "dog"), per_class=4)
    write_class_images(tmp_path, classes=("cat", "dog", "unlabeled"), per_class=2, seed=1)
    data = discover(tmp_path)
    assert data.classes == ("cat", "dog") and len(data.train) + len(data.val) == 8
    assert data.notes == (
        "cat/, dog/ beside train/ hold images that are not read: with train/ thaw reads the classes in train/, val/ and "
        "test/; move them into train/ (train/CLASS/IMAGE) to train on them",
    )


def test_files_in_hidden_folders_are_not_read(tmp_path: Path) -> None:
    # A notebook's .ipynb_checkpoints or a .git folder beside the images holds no training data.
    write_class_images(tmp_path, per_class=4)
    (tmp_path / "red" / ".ipynb_checkpoints").mkdir()
    (tmp_path / "red" / ".ipynb_checkpoints" / "photo-checkpoint.png").write_bytes((tmp_path / "red" / "000.png").read_bytes())
    data = discover(tmp_path)
    assert not any(".ipynb_checkpoints" in str(path) for path, _ in data.train + data.val) and not data.skipped
    assert len(data.train) + len(data.val) == 12


def test_a_path_under_the_data_is_told_read_only_where_discover_reads_it(tmp_path: Path) -> None:
    """What decides whether a run folder put under the data would become part of it."""
    classes, splits = tmp_path / "classes", tmp_path / "splits"
    write_class_images(classes, per_class=2)
    write_class_images(splits / "train", per_class=2)
    assert would_be_read(classes, classes / "runs" / "a") and would_be_read(classes, classes)
    assert not would_be_read(classes, classes / ".runs" / "a")  # hidden folders are not read
    assert not would_be_read(classes, tmp_path / "runs")  # beside it
    assert would_be_read(splits, splits / "train" / "red" / "run") and would_be_read(splits, splits / "Val" / "run")
    assert not would_be_read(splits, splits / "runs" / "a")  # train/ fixes the layout: other folders are not read
    manifest = tmp_path / "labels.csv"
    manifest.write_text("path,label\n")
    assert not would_be_read(manifest, tmp_path / "runs")  # a manifest lists its own files
    # and discover agrees: a folder of files beside train/ is not read, one among the classes is a class
    write_class_images(splits / "runs", classes=("stray",), per_class=2)
    assert discover(splits).classes == ("blue", "green", "red")
    write_class_images(classes / "runs", classes=("stray",), per_class=2)
    assert "runs" in discover(classes).classes



def test_a_file_under_the_data_is_told_read_only_where_discover_reads_it(tmp_path: Path) -> None:
    """A plot beside the class folders (or in train/ beside its classes) is not read; one in a class folder is."""
    classes, splits = tmp_path / "classes", tmp_path / "splits"
    write_class_images(classes, per_class=2)
    write_class_images(splits / "train", per_class=2)
    for root, beside, inside in [(classes, classes / "lr.png", classes / "red" / "lr.png"), (splits, splits / "train" / "lr.png", splits / "train" / "red" / "lr.png")]:
        assert not would_be_read(root, beside, is_file=True) and would_be_read(root, inside, is_file=True)
        before = discover(root).everything()
        beside.write_bytes((classes / "red" / "000.png").read_bytes())  # a real image, even
        assert discover(root).everything() == before  # discover agrees
    assert not would_be_read(classes, classes / "red" / ".hidden" / "lr.png", is_file=True)


def test_only_class_names_that_differ_in_case_alone_are_noted(tmp_path: Path) -> None:
    write_class_images(tmp_path / "folders", classes=("cat", "Cat", "CAT", "dog"), per_class=2, size=8)
    (tmp_path / "list.csv").write_text("".join(f"folders/{folder}/00{i}.png,{label}\n" for folder, label in [("cat", "dog"), ("dog", "dogs")] for i in (0, 1)))
    assert discover(tmp_path / "folders").notes == ("classes CAT and Cat and cat differ only in case, so they are 3 classes; rename them to one name if they are one",)
    assert discover(tmp_path / "list.csv", val_split=0.5).notes == ()  # dog and dogs: two names, not one in two cases


def test_class_names_that_are_one_number_written_two_ways_are_noted(tmp_path: Path) -> None:
    """A label column a spreadsheet rewrote in part (`1`, `1.0`) splits one class in two: said as the run starts."""
    write_class_images(tmp_path / "folders", classes=("a", "b"), per_class=4, size=8)
    labels = {"a": ["1", "1.0", "1", "1.0"], "b": ["2", "02", "02", "2"]}
    rows = [f"folders/{folder}/00{i}.png,{labels[folder][i]}\n" for folder in ("a", "b") for i in range(4)]
    (tmp_path / "list.csv").write_text("".join(rows))
    notes = discover(tmp_path / "list.csv", val_split=0.5).notes
    assert notes == (
        "classes 02 and 2 are the same number written 2 ways, so they are 2 classes; give them one name if they are one",
        "classes 1 and 1.0 are the same number written 2 ways, so they are 2 classes; give them one name if they are one",
    )
    other = [("1", "10"), ("inf", "Infinity"), ("9007199254740993", "9007199254740992")]  # two numbers; no number; exact digits
    for first, second in other:
        (tmp_path / "other.csv").write_text("".join(f"folders/{f}/00{i}.png,{label}\n" for f, label in [("a", first), ("b", second)] for i in range(4)))
        assert discover(tmp_path / "other.csv", val_split=0.5).notes == (), (first, second)


def test_one_class_folder_with_folders_of_its_own_is_data_to_score(tmp_path: Path) -> None:
    """cat/indoor/ and cat/outdoor/ held out to score: one class, cat, not a folder passed one level too high."""
    write_class_images(tmp_path / "held" / "cat", classes=("indoor", "outdoor"), per_class=2, size=8)
    data = discover(tmp_path / "held", min_classes=1)
    assert data.classes == ("cat",) and len(data.everything()) == 4


def test_one_image_a_class_is_data_to_score(tmp_path: Path) -> None:
    write_class_images(tmp_path, per_class=1, size=8)
    assert len(discover(tmp_path, min_classes=1).everything()) == 3  # scored whole: no val needed


@pytest.mark.parametrize("layout", ["class folders", "train folder", "manifest"])
def test_a_class_of_one_image_that_val_has_none_of_is_said(tmp_path: Path, layout: str) -> None:
    """A class of a single image stays in train: val, which chooses the epoch delivered, has none of it. Said as a
    run starts, in each layout thaw holds val out of; data to score (min_classes 1) is scored whole, so not there."""
    root = tmp_path / "data"
    images = root / "train" if layout == "train folder" else root
    write_class_images(images, classes=("red", "green"), per_class=4)
    write_class_images(images, classes=("blue",), per_class=1, seed=1)
    source = root
    if layout == "manifest":
        source = root / "labels.csv"
        source.write_text("path,label\n" + "".join(f"{image.relative_to(root)},{image.parent.name}\n" for image in sorted(root.rglob("*.png"))))
    data = discover(source, val_split=0.25)
    assert {data.classes[label] for _, label in data.val} == {"red", "green"}
    assert data.notes == ("val has no image of class(es) blue: each has a single training image, kept to train on, so val scores say nothing of them; add images of them",)
    assert discover(source, val_split=0.25, min_classes=1).notes == ()
    write_class_images(images, classes=("blue",), per_class=2, seed=1)  # a second image: one for val
    if layout == "manifest":
        source.write_text("path,label\n" + "".join(f"{image.relative_to(root)},{image.parent.name}\n" for image in sorted(root.rglob("*.png"))))
    assert discover(source, val_split=0.25).notes == ()


def test_held_out_images_that_are_copies_of_training_images_are_cautioned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """val/ made by copying train/ scores memory and chooses the delivered epoch by it: said as the run starts."""
    from thaw.data import folders

    root = tmp_path / "data"
    write_class_images(root / "train", per_class=4, seed=0)
    write_class_images(root / "val", per_class=2, seed=1)
    write_class_images(root / "test", per_class=2, seed=2)
    assert discover(root).cautions == ()
    shutil.copy(root / "train" / "red" / "000.png", root / "val" / "red" / "copied.png")
    for name in ("001.png", "002.png"):
        shutil.copy(root / "train" / "blue" / name, root / "test" / "blue" / f"also-{name}")
    val_said, test_said = discover(root).cautions
    assert val_said.startswith(f"1 of 7 val images are copies of training images (the same bytes, such as {root / 'val' / 'red' / 'copied.png'} and {root / 'train' / 'red' / '000.png'})")
    assert "val's choose the epoch delivered" in val_said
    assert test_said.startswith("2 of 8 test images are copies of training images") and "epoch" not in test_said
    monkeypatch.setattr(folders, "_digest", lambda *_: pytest.fail("a file was read"))
    assert discover(root, min_classes=1).cautions == ()  # data to score (thaw evaluate): nothing trains on it, nothing read
    monkeypatch.setenv("RANK", "1")  # torchrun's second process: the first says the cautions, this one reads nothing for them
    assert discover(root).cautions == ()
    monkeypatch.delenv("RANK")
    monkeypatch.setattr(folders, "MAX_HEAD_READS", 10)  # more files of a shared size than that: left out, nothing read
    assert discover(root).cautions == ()


def test_images_of_the_same_size_in_bytes_are_no_copies_and_are_not_read_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Uncompressed BMPs of one shape all have one size: only the same bytes make a copy. Files that differ in their
    first 4 KiB are never read whole (a data set of large TIFFs would be read again before training)."""
    import numpy as np
    from PIL import Image

    from thaw.data import folders

    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    top = rng.integers(0, 255, (120, 200, 3), dtype=np.uint8)  # the first 72,000 bytes of pixels, alike in some files
    for split in ("train", "val"):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for item in range(2):
                pixels = rng.integers(0, 255, (200, 200, 3), dtype=np.uint8)
                if label == "b":
                    pixels[-120:] = top  # a BMP stores its rows bottom first: these files begin alike
                Image.fromarray(pixels).save(root / split / label / f"{item}.bmp")
    assert len({path.stat().st_size for path in root.rglob("*.bmp")}) == 1
    read_whole = []
    digest = folders._digest
    monkeypatch.setattr(folders, "_digest", lambda path, limit=None: (read_whole.append(path) if limit is None else None) or digest(path, limit))
    assert discover(root).cautions == ()
    assert sorted(path.parent.name for path in read_whole) == ["b"] * 4  # only the files alike in their first 4 KiB


def test_images_beside_the_class_folders_are_warned_of_as_not_read(tmp_path: Path) -> None:
    """A photo dropped straight into train/ (or DATA/) has no class: it was passed over without a word."""
    split = tmp_path / "split"
    write_class_images(split / "train", per_class=4)
    write_class_images(split / "val", per_class=2, seed=1)
    (split / "train" / "stray.png").write_bytes((split / "train" / "red" / "000.png").read_bytes())
    data = discover(split)
    assert len(data.train) == 12 and all(path.name != "stray.png" for path, _ in data.train + data.val)
    assert data.notes == (
        f"{split / 'train'}/ holds 1 image file(s) beside its class folders (first: stray.png); they have no class, "
        "so they are not read: move them into a class folder to use them",
    )
    classes = write_class_images(tmp_path / "classes", per_class=4)
    (classes / "IMG_0001.jpg").write_bytes((classes / "red" / "000.png").read_bytes())
    (classes / "notes.txt").write_text("not an image")  # other files there are not photos left out
    assert [note for note in discover(classes).notes if "beside its class folders" in note] == [
        f"{classes}/ holds 1 image file(s) beside its class folders (first: IMG_0001.jpg); they have no class, "
        "so they are not read: move them into a class folder to use them"
    ]
    assert not [note for note in discover(write_class_images(tmp_path / "clean", per_class=4)).notes if "beside" in note]


@pytest.mark.parametrize("name", ["photos.zip", "labels.txt"])
def test_a_file_that_is_no_manifest_is_one_line_saying_what_to_pass(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_text("path\tlabel\n")
    assert _refusal(tmp_path / name) == (
        f"{tmp_path / name} is a file; pass a folder of class folders, a folder with train/ and val/, or a .csv (or .tsv) manifest"
    )


def test_a_linked_folder_inside_a_class_folder_is_read_once_and_a_loop_ends(tmp_path: Path) -> None:
    """A link to a folder of more images inside a class folder was passed over without a word: a class whose images
    all lay behind one was called empty."""
    data = write_class_images(tmp_path / "data", per_class=3)
    more = write_class_images(tmp_path / "elsewhere", classes=("red",), per_class=2, seed=1) / "red"
    (data / "red" / "batch2").symlink_to(more)
    (data / "red" / "again").symlink_to(more)  # the same folder twice: its images once
    (data / "red" / "loop").symlink_to(data / "red")  # a link to the folder it is in: no endless listing
    (data / "blue" / "up").symlink_to(tmp_path)  # a folder around the data: not listed (it holds elsewhere/, only-linked/)
    (data / "blue" / "again.png").symlink_to(data / "blue" / "000.png")  # a file twice in one class: two samples, as before
    (data / "green" / "all").symlink_to(write_class_images(tmp_path / "only-linked", classes=("green",), per_class=3) / "green")
    (data / "green" / "000.png").unlink(), (data / "green" / "001.png").unlink(), (data / "green" / "002.png").unlink()
    found = discover(data)
    by_class = Counter(found.classes[label] for _, label in found.everything())
    assert by_class == {"red": 5, "green": 3, "blue": 4}
    red = sorted(str(Path(path).relative_to(data)) for path, label in found.everything() if found.classes[label] == "red")
    # the folder linked twice is named by the first link in name order, whatever order the disk lists them in
    assert red == ["red/000.png", "red/001.png", "red/002.png", "red/again/000.png", "red/again/001.png"]


def test_an_image_in_two_class_folders_is_refused_as_a_manifest_listing_it_twice_is(tmp_path: Path) -> None:
    """A class folder linked to another trained the same images under two labels, without a word."""
    data = write_class_images(tmp_path / "data", classes=("cat", "dog"), per_class=3)
    (data / "kitty").symlink_to(data / "cat")
    assert _refusal(data) == (f"{data}: 3 images are in more than one class folder (first: {data}/cat/000.png (cat, kitty)), as a "
                              "class folder that links to another puts them; keep each image in one class folder")
    (data / "kitty").unlink()
    os.link(data / "cat" / "001.png", data / "dog" / "hard.png")  # a hard link: the same file under two names
    (data / "dog" / "soft.png").symlink_to(data / "cat" / "002.png")
    assert _refusal(data).startswith(f"{data}: 2 images are in more than one class folder (first: {data}/cat/001.png (cat, dog))")
    (data / "dog" / "hard.png").unlink(), (data / "dog" / "soft.png").unlink()
    shutil.copy(data / "cat" / "001.png", data / "dog" / "copy.png")  # equal bytes, another file: trains (warned as a copy)
    assert len(discover(data).everything()) == 7


@pytest.mark.parametrize("asked, real", [(1e-9, "33.3%"), (0.999, "83.3%")])
def test_a_share_that_whole_images_per_class_cannot_hold_says_the_real_one(tmp_path: Path, asked: float, real: str) -> None:
    """`--val-split 1e-9` said '1e-07% held out' beside 6 train and 3 val images: each class holds one out at the least."""
    root = write_class_images(tmp_path / "data", per_class=3 if asked < 0.5 else 6)
    note = f"({as_percent(asked)} asked, in whole images per class)"
    data = discover(root, val_split=asked)
    assert data.layout == f"class folders, {real} held out {note} (seed 0)"
    assert f"{100 * len(data.val) / (len(data.train) + len(data.val)):.3g}%" == real
    write_class_images(tmp_path / "split" / "train", per_class=3 if asked < 0.5 else 6)
    assert discover(tmp_path / "split", val_split=asked).layout == f"split folders (train only), {real} of train held out as val {note} (seed 0)"
    manifest = tmp_path / "labels.csv"
    manifest.write_text("".join(f"{path},{path.parent.name}\n" for path in sorted(root.glob("*/*.png"))))
    assert discover(manifest, val_split=asked).layout == f"CSV manifest, {real} held out {note}"
